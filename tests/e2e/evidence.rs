//! Session evidence: recorded, chained, replicated, readable by the right
//! people, and complete across a leader kill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use custody_cli::client::Client;
use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_proto::evidence::v1 as ev;
use custody_proto::v1 as api;

use crate::edge::{custody, text};
use crate::harness::{self, eventually, TestCluster};

const POLICY: &str = include_str!("../../examples/policy.yaml");

async fn system_with(labels: &str) -> TestCluster {
    system_from(GenOptions::default(), POLICY, labels).await
}

async fn system_from(opts: GenOptions, policy: &str, labels: &str) -> TestCluster {
    let (mut c, _) = harness::started(opts).await;
    c.client(&[])
        .unwrap()
        .policy_apply(policy, "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "local-shell");
    spec.resources_toml = format!(
        "[[resources]]\nname = \"local-shell\"\nkind = \"shell\"\nlabels = {{ {labels} }}\n"
    );
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("local-shell", 3, Duration::from_secs(20))
        .await
        .unwrap();
    c
}

/// Runs `script` on local-shell as `token` through `nodes`; returns the session id.
fn exec_session(c: &TestCluster, nodes: &[u64], token: &str, script: &str) -> String {
    let out = custody(
        c,
        nodes,
        token,
        &["exec", "local-shell", "--", "sh", "-c", script],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stderr)
        .split("custody: session ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_session_is_recorded_and_shown() {
    let c = system_with("env = \"dev\"").await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let t0 = now_ms();
    let out = custody(
        &c,
        &[2],
        &alice,
        &[
            "exec",
            "local-shell",
            "--",
            "sh",
            "-c",
            "echo hi; echo err >&2; exit 3",
        ],
    );
    let t1 = now_ms();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let sid = err
        .split("custody: session ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();

    // An auditor reads it, as JSON, from another node.
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let out = custody(&c, &[3], &audrey, &["sessions", "show", &sid, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["session"];
    assert_eq!(s["subject"], "alice");
    assert_eq!(s["resource"], "local-shell");
    assert_eq!(s["command"], "sh -c 'echo hi; echo err >&2; exit 3'");
    assert_eq!(s["exit_code"], 3);
    assert_eq!(s["closed"], true);
    assert_eq!(s["mode"], "async");
    let events = v["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"session_opened"));
    assert_eq!(types[1], "command");
    assert_eq!(types[types.len() - 2], "outcome");
    assert_eq!(types.last(), Some(&"session_closed"));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64, "sequence numbers have no gaps");
        let at = e["at_ms"].as_u64().unwrap();
        assert!(at >= t0 && at <= t1, "timestamp {at} outside [{t0}, {t1}]");
        assert_eq!(e["session_id"], sid.as_str());
    }
    let opened = &events[0]["event"];
    assert_eq!(opened["identity"]["subject"], "alice");
    assert_eq!(
        opened["identity"]["groups"],
        serde_json::json!(["engineers"])
    );
    assert_eq!(opened["identity"]["client_kind"], "human");
    assert_eq!(opened["rule"], "engineers-dev");
    assert_eq!(opened["edge"], "e1");
    assert_eq!(
        events[1]["event"]["argv"],
        serde_json::json!(["sh", "-c", "echo hi; echo err >&2; exit 3"])
    );
    let stream = |name: &str| -> Vec<u8> {
        events
            .iter()
            .filter(|e| e["type"] == "output" && e["event"]["stream"] == name)
            .flat_map(|e| {
                base64::engine::general_purpose::STANDARD
                    .decode(e["event"]["data_b64"].as_str().unwrap())
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(stream("stdout"), b"hi\n");
    assert_eq!(stream("stderr"), b"err\n");
    let outcome = &events[events.len() - 2]["event"];
    assert_eq!(outcome["exit_code"], 3);

    // The JSON round-trips: the same events through the API, field by field.
    let client = c
        .client_as(&[1], Duration::from_secs(10), Some(audrey.clone()))
        .unwrap();
    let got = client.get_session(&sid).await.unwrap();
    assert_eq!(got.events.len(), events.len());
    for (e, j) in got.events.iter().zip(events) {
        assert_eq!(j["seq"], e.seq);
        assert_eq!(j["at_ms"], e.at_ms);
        if let Some(ev::event::Kind::Output(o)) = &e.kind {
            let b = base64::engine::general_purpose::STANDARD
                .decode(j["event"]["data_b64"].as_str().unwrap())
                .unwrap();
            assert_eq!(b, o.data.to_vec());
        }
    }

    // Listing: filters, and people see only their own sessions.
    let list = |token: &str, extra: &[&str]| -> usize {
        let mut args = vec!["sessions", "list", "--json"];
        args.extend_from_slice(extra);
        let out = custody(&c, &[], token, &args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(list(&audrey, &[]), 1);
    assert_eq!(list(&audrey, &["--resource", "local-shell"]), 1);
    assert_eq!(list(&audrey, &["--resource", "other"]), 0);
    assert_eq!(list(&audrey, &["--identity", "alice"]), 1);
    assert_eq!(list(&audrey, &["--region", "eu"]), 1, "the edge's region");
    assert_eq!(
        list(&audrey, &["--region", "us"]),
        1,
        "the recording node's region"
    );
    assert_eq!(list(&audrey, &["--region", "ap"]), 0);
    assert_eq!(list(&alice, &[]), 1);
    let bob = c.mint_token("bob").await.unwrap().token;
    assert_eq!(list(&bob, &[]), 0, "bob sees no one else's sessions");
    let out = custody(&c, &[], &bob, &["sessions", "show", &sid]);
    assert!(
        text(&out.stderr).contains("requires role admin or auditor"),
        "{}",
        text(&out.stderr)
    );

    // Replay as asciicast v2.
    let cast = c.dir.join("s.cast");
    let out = custody(
        &c,
        &[],
        &audrey,
        &[
            "sessions",
            "replay",
            &sid,
            "--asciicast",
            cast.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cast = std::fs::read_to_string(cast).unwrap();
    let mut lines = cast.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let frames: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    // stdout and stderr are separate pipes: their relative order may vary.
    let mut played: Vec<&str> = frames.iter().map(|f| f[2].as_str().unwrap()).collect();
    played.sort();
    assert_eq!(played, vec!["err\n", "hi\n"]);
    let times: Vec<f64> = frames.iter().map(|f| f[0].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_runs_nothing_without_a_quorum() {
    let mut c = system_with("env = \"dev\", evidence = \"strict\"").await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let marker = c.dir.join("ran");
    let touch = format!("touch {}", marker.display());
    c.stop(2).unwrap();
    c.stop(3).unwrap();
    let out = custody(
        &c,
        &[1],
        &alice,
        &["exec", "local-shell", "--", "sh", "-c", &touch],
    );
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    eprintln!("refused: {}", text(&out.stderr));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!marker.exists(), "a command ran without committed evidence");

    c.start(2).unwrap();
    c.start(3).unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = custody(
            &c,
            &[],
            &alice,
            &["exec", "local-shell", "--", "sh", "-c", &touch],
        );
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(marker.exists());
    let list = c
        .client_as(&[], Duration::from_secs(10), Some(alice))
        .unwrap()
        .list_sessions(api::ListSessionsRequest::default())
        .await
        .unwrap();
    assert!(list
        .iter()
        .any(|s| s.mode == "strict" && s.exit_code == 0 && s.closed));
}

/// The unique lines session `k` prints.
fn line(k: usize, i: usize) -> String {
    format!("s{k}-{i}\n")
}

const LINES: usize = 120;

/// Runs session `k` through `client`; returns (session id, exit code or error).
async fn run_session(client: Arc<Client>, k: usize) -> (Option<String>, Result<i32, String>) {
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); echo s{k}-$i; sleep 0.01; done");
    let argv: Vec<String> = vec!["sh".into(), "-c".into(), script];
    let (tx, mut out) = match client.exec_open("local-shell", &argv).await {
        Ok(x) => x,
        Err(e) => return (None, Err(e.to_string())),
    };
    let _ = tx
        .send(api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        })
        .await;
    let mut sid = None;
    loop {
        match out.message().await {
            Ok(Some(m)) => match m.kind {
                Some(api::exec_output::Kind::Started(s)) => sid = Some(s.session_id),
                Some(api::exec_output::Kind::Exit(x)) => return (sid, Ok(x.code)),
                _ => {}
            },
            Ok(None) => return (sid, Err("ended without exit".into())),
            Err(s) => return (sid, Err(s.message().to_owned())),
        }
    }
}

fn stdout_of(events: &[ev::Event]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(ev::event::Kind::Output(o)) if o.stream == "stdout" => {
                Some(String::from_utf8_lossy(&o.data).into_owned())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_mid_session_loses_and_duplicates_nothing() {
    let mut c = system_with("env = \"dev\"").await;
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(10))
        .await
        .unwrap();
    let others: Vec<u64> = c.nodes.keys().copied().filter(|i| *i != leader).collect();
    let alice = c.mint_token("alice").await.unwrap().token;
    let mut tasks = Vec::new();
    for k in 0..20 {
        // Callers reach the surviving nodes; the edge is connected to all.
        let node = others[k % others.len()];
        let client = Arc::new(
            c.client_as(&[node], Duration::from_secs(30), Some(alice.clone()))
                .unwrap(),
        );
        tasks.push(tokio::spawn(run_session(client, k)));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.kill(leader).unwrap();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    // The region of the killed node is gone; the others hold everything.
    let auditor = c.mint_token("audrey").await.unwrap().token;
    let mut completed = 0;
    for node in others.iter().copied() {
        let reader = c
            .client_as(&[node], Duration::from_secs(20), Some(auditor.clone()))
            .unwrap();
        for (k, (sid, result)) in results.iter().enumerate() {
            let Some(sid) = sid else { continue };
            let got = reader.get_session(sid).await.unwrap();
            let expected: String = (1..=LINES).map(|i| line(k, i)).collect();
            let seen = stdout_of(&got.events);
            match result {
                Ok(0) => {
                    assert_eq!(seen, expected, "session {k}: acknowledged output differs");
                    assert!(got.session.as_ref().unwrap().closed);
                    completed += 1;
                }
                other => {
                    // Whatever was recorded is an exact prefix: no gap, no duplicate.
                    assert!(
                        expected.starts_with(&seen),
                        "session {k} ({other:?}): recorded output is not a prefix"
                    );
                }
            }
        }
    }
    eprintln!(
        "{completed} session reads complete across {} nodes",
        others.len()
    );
    assert!(
        completed >= 2 * 15,
        "most sessions should finish: {results:?}"
    );

    // After restart the killed node serves the same evidence.
    c.start(leader).unwrap();
    let reader = c
        .client_as(&[leader], Duration::from_secs(20), Some(auditor.clone()))
        .unwrap();
    let (k, sid) = results
        .iter()
        .enumerate()
        .find_map(|(k, (sid, r))| (r == &Ok(0)).then(|| (k, sid.clone().unwrap())))
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "restarted node serves the session",
        || {
            let reader = &reader;
            let sid = sid.clone();
            async move {
                reader.get_session(&sid).await.is_ok_and(|g| {
                    stdout_of(&g.events) == (1..=LINES).map(|i| line(k, i)).collect::<String>()
                })
            }
        },
    )
    .await;
}

pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_lines(path: &std::path::Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    f(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_signed_and_any_tampering_is_caught() {
    let c = system_with("env = \"dev\"").await;
    let alice = c.mint_token("alice").await.unwrap().token;
    for i in 0..3 {
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
                &format!("echo run {i}; echo line two"),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let dir = c.dir.join("export");
    let out = custody(
        &c,
        &[],
        &audrey,
        &["export", "--out", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("exported 3 sessions"),
        "{}",
        text(&out.stdout)
    );
    let csv = std::fs::read_to_string(dir.join("sessions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.contains("alice") && csv.contains("local-shell"));

    // Non-auditors cannot export; region filters apply.
    let out = custody(
        &c,
        &[],
        &alice,
        &["export", "--out", c.dir.join("x").to_str().unwrap()],
    );
    assert!(
        text(&out.stderr).contains("requires role"),
        "{}",
        text(&out.stderr)
    );
    let out = custody(
        &c,
        &[],
        &audrey,
        &[
            "export",
            "--out",
            c.dir.join("ap").to_str().unwrap(),
            "--region",
            "ap",
        ],
    );
    assert!(
        text(&out.stdout).contains("exported 0 sessions"),
        "{}",
        text(&out.stdout)
    );

    let status = custody(&c, &[], &audrey, &["cluster", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let key = st["evidence_public_key"].as_str().unwrap().to_owned();
    assert!(!key.is_empty());
    let verify = |d: &std::path::Path, key: &str| -> std::process::Output {
        custody(
            &c,
            &[],
            "",
            &["verify", d.to_str().unwrap(), "--public-key", key],
        )
    };
    let ok = verify(&dir, &key);
    assert!(
        ok.status.success(),
        "untouched export must verify: {}",
        text(&ok.stderr)
    );

    let mut n = 0;
    let mut tampered = |name: &str, f: &dyn Fn(&std::path::Path)| {
        n += 1;
        let d = c.dir.join(format!("t{n}"));
        copy_dir(&dir, &d);
        f(&d);
        let out = verify(&d, &key);
        assert!(
            !out.status.success(),
            "{name}: verify passed a tampered export"
        );
        eprintln!("{name}: {}", text(&out.stderr).trim());
    };
    tampered("flip a byte", &|d| {
        let p = d.join("events.jsonl");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.iter().position(|x| *x == b'r').unwrap();
        b[i] = b'R';
        std::fs::write(p, b).unwrap();
    });
    tampered("drop an event", &|d| {
        edit_lines(&d.join("events.jsonl"), |l| {
            l.remove(3);
        })
    });
    tampered("swap two events", &|d| {
        edit_lines(&d.join("events.jsonl"), |l| l.swap(2, 3))
    });
    tampered("drop a chunk", &|d| {
        edit_lines(&d.join("chunks.jsonl"), |l| {
            l.remove(0);
        })
    });
    tampered("edit a csv row", &|d| {
        let p = d.join("sessions.csv");
        let s = std::fs::read_to_string(&p)
            .unwrap()
            .replace("alice", "mallory");
        std::fs::write(p, s).unwrap();
    });
    tampered("edit the manifest", &|d| {
        // Claim one event fewer for the first session.
        let p = d.join("manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let n = m["sessions"][0]["events"].as_u64().unwrap();
        m["sessions"][0]["events"] = serde_json::json!(n - 1);
        let edited = serde_json::to_vec_pretty(&m).unwrap();
        assert_ne!(edited, std::fs::read(&p).unwrap());
        std::fs::write(p, edited).unwrap();
    });
    // A forger who rewrites everything consistently and re-signs with their own key.
    tampered("re-signed with another key", &|d| {
        edit_lines(&d.join("events.jsonl"), |l| {
            l.pop();
        });
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let m = std::fs::read(d.join("manifest.json")).unwrap();
        let sig = base64::engine::general_purpose::STANDARD.encode(pair.sign(&m).as_ref());
        std::fs::write(d.join("manifest.sig"), sig).unwrap();
    });
    // The wrong public key fails too.
    let other = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    assert!(!verify(&dir, &other).status.success());
}

fn show_json(c: &TestCluster, token: &str, sid: &str) -> serde_json::Value {
    let out = custody(c, &[], token, &["sessions", "show", sid, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_evidence_except_under_legal_hold() {
    // The example policy with its retention rules replaced by a 3-second one.
    let base = POLICY.split("\nretention:").next().unwrap();
    let policy = format!(
        "{base}\nretention:\n  - name: short\n    resource: {{ names: [local-*], kinds: [shell] }}\n    retain: 3s\n"
    );
    let opts = GenOptions {
        retention_sweep_secs: Some(1),
        ..GenOptions::default()
    };
    let c = system_from(opts, &policy, "env = \"dev\"").await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let held = exec_session(&c, &[], &alice, "echo keep me");
    let doomed = exec_session(&c, &[], &alice, "echo forget me");

    // Only admins and auditors place holds; a hold needs a reason and a target.
    let hold = |token: &str, args: &[&str]| {
        let mut a = vec!["evidence", "hold", "add"];
        a.extend_from_slice(args);
        custody(&c, &[], token, &a)
    };
    let out = hold(&alice, &["--session", &held, "--reason", "mine"]);
    assert!(
        text(&out.stderr).contains("requires role"),
        "{}",
        text(&out.stderr)
    );
    let out = hold(&audrey, &["--reason", "no target"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("names a session"),
        "{}",
        text(&out.stderr)
    );
    let out = hold(&audrey, &["--session", &held, "--reason", "litigation 42"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hold_id = text(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned();

    // The leader's sweep purges the unheld session once it is 3 s old.
    eventually(Duration::from_secs(20), "unheld session purged", || {
        let v = show_json(&c, &audrey, &doomed);
        async move { v["session"]["purged_at_ms"].as_u64().unwrap_or(0) > 0 }
    })
    .await;
    let v = show_json(&c, &audrey, &doomed);
    assert_eq!(v["session"]["purge_rule"], "short");
    assert_eq!(v["events"].as_array().unwrap().len(), 0, "events are gone");
    assert_eq!(
        v["session"]["chunks"], 1,
        "the record of what existed stays"
    );
    let kept = show_json(&c, &audrey, &held);
    assert_eq!(kept["session"]["purged_at_ms"], 0);
    assert!(kept["events"].to_string().contains("keep me"));
    // Purged sessions leave the listings and exports.
    let out = custody(&c, &[], &audrey, &["sessions", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![held.as_str()]);

    // Manual purges are for admins; nothing else is due.
    let out = custody(&c, &[], &audrey, &["evidence", "purge"]);
    assert!(
        text(&out.stderr).contains("requires role"),
        "{}",
        text(&out.stderr)
    );
    let out = custody(&c, &[], &admin, &["evidence", "purge"]);
    assert!(
        text(&out.stdout).contains("purged the evidence of 0 sessions"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Releasing needs a reason and an existing, active hold.
    let release = |id: &str, reason: &str| {
        custody(
            &c,
            &[],
            &audrey,
            &["evidence", "hold", "release", id, "--reason", reason],
        )
    };
    let out = release("999999", "x");
    assert!(
        text(&out.stderr).contains("no legal hold"),
        "{}",
        text(&out.stderr)
    );
    let out = release(&hold_id, " ");
    assert!(
        text(&out.stderr).contains("needs a reason"),
        "{}",
        text(&out.stderr)
    );
    let out = custody(&c, &[], &audrey, &["evidence", "hold", "list", "--json"]);
    let holds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(holds.as_array().unwrap().len(), 1);
    assert_eq!(holds[0]["session_id"], held.as_str());
    let out = release(&hold_id, "case closed");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = release(&hold_id, "again");
    assert!(
        text(&out.stderr).contains("already released"),
        "{}",
        text(&out.stderr)
    );
    eventually(Duration::from_secs(20), "released session purged", || {
        let v = show_json(&c, &audrey, &held);
        async move { v["session"]["purged_at_ms"].as_u64().unwrap_or(0) > 0 }
    })
    .await;
    let out = custody(
        &c,
        &[],
        &audrey,
        &["evidence", "hold", "list", "--all", "--json"],
    );
    let holds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(holds[0]["release_reason"], "case closed");
}

/// Exports `dir` as `token` through `nodes` and checks it offline.
fn export_verified(c: &TestCluster, nodes: &[u64], token: &str, dir: &std::path::Path, key: &str) {
    let out = custody(c, nodes, token, &["export", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = custody(
        c,
        &[],
        "",
        &["verify", dir.to_str().unwrap(), "--public-key", key],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn manifest_sessions(dir: &std::path::Path) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    m["sessions"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_region_loses_no_exported_evidence() {
    let mut c = system_with("env = \"dev\"").await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    // One session recorded by each region's node (eu, us, ap).
    let mut sids = Vec::new();
    for node in [1u64, 2, 3] {
        sids.push(exec_session(
            &c,
            &[node],
            &alice,
            &format!("echo via node {node}"),
        ));
    }
    let status = custody(&c, &[], &audrey, &["cluster", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let key = st["evidence_public_key"].as_str().unwrap().to_owned();
    let before = c.dir.join("before");
    export_verified(&c, &[], &audrey, &before, &key);
    let regions: Vec<String> = manifest_sessions(&before)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].to_string())
        .collect();
    assert_eq!(regions.len(), 3, "{regions:?}");

    // Every node of region eu (node 1) is lost.
    let eu: Vec<u64> = c
        .nodes
        .values()
        .filter(|n| n.region == "eu")
        .map(|n| n.id)
        .collect();
    assert_eq!(eu, vec![1]);
    c.kill(1).unwrap();
    let survivors = [2u64, 3];
    // The first export may meet an election; each attempt writes a fresh directory.
    let mut after = None;
    for attempt in 0..20 {
        let d = c.dir.join(format!("after-{attempt}"));
        let out = custody(
            &c,
            &survivors,
            &audrey,
            &["export", "--out", d.to_str().unwrap()],
        );
        if out.status.success() {
            after = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = after.expect("an export succeeds after region loss");
    let out = custody(
        &c,
        &[],
        "",
        &["verify", after.to_str().unwrap(), "--public-key", &key],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same sessions, chain heads and events, byte for byte.
    assert_eq!(manifest_sessions(&before), manifest_sessions(&after));
    for f in ["events.jsonl", "chunks.jsonl", "sessions.csv"] {
        assert_eq!(
            std::fs::read(before.join(f)).unwrap(),
            std::fs::read(after.join(f)).unwrap(),
            "{f} differs after losing region eu"
        );
    }
    // The lost region's sessions are still found by region.
    let eu_dir = c.dir.join("eu");
    let out = custody(
        &c,
        &survivors,
        &audrey,
        &[
            "export",
            "--out",
            eu_dir.to_str().unwrap(),
            "--region",
            "eu",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let eu_sessions = manifest_sessions(&eu_dir);
    assert!(
        eu_sessions.to_string().contains(&sids[0]),
        "session recorded in eu is exported after eu is gone: {eu_sessions}"
    );
    // And new sessions are still recorded without region eu.
    let sid = exec_session(&c, &survivors, &alice, "echo after the loss");
    let v = show_json(&c, &audrey, &sid);
    assert!(v["events"].to_string().contains("after the loss"));
}
