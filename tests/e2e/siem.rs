//! The SIEM stream: a node configured with a syslog receiver (RFC 5424 over
//! TCP), an HTTP receiver and a file sends them the audit events of a
//! session and of a refused token as OCSF, with the fields the evidence has.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use custody_cli::dev::GenOptions;

use crate::edge::{custody, text};
use crate::harness;

type Seen = Arc<Mutex<Vec<Value>>>;

/// A syslog receiver: octet-counted RFC 5424 frames; keeps each frame's JSON.
async fn syslog_receiver(seen: Seen) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 8192];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // `LEN MSG`, with MSG = `<PRI>1 TS HOST APP PROCID MSGID - JSON`.
                    while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                        let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                        if buf.len() < sp + 1 + len {
                            break;
                        }
                        let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                        buf.drain(..sp + 1 + len);
                        assert!(msg.starts_with('<') && msg.contains(">1 "), "{msg}");
                        let json = msg.split_once(" - ").unwrap().1;
                        seen.lock()
                            .unwrap()
                            .push(serde_json::from_str(json).unwrap());
                    }
                }
            });
        }
    });
    addr
}

/// An HTTP receiver of JSON arrays.
async fn http_receiver(seen: Seen) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |axum::Json(batch): axum::Json<Vec<Value>>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().extend(batch);
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

fn find<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["unmapped"]["event"] == name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_reach_syslog_http_and_a_file_as_ocsf() {
    let mut c = crate::edge::system(GenOptions::default()).await;
    let (syslog, http): (Seen, Seen) = Default::default();
    let syslog_addr = syslog_receiver(syslog.clone()).await;
    let http_addr = http_receiver(http.clone()).await;
    let file = c.dir.join("node-1-audit.jsonl");
    c.stop(1).unwrap();
    let mut cfg = std::fs::OpenOptions::new()
        .append(true)
        .open(&c.nodes[&1].config)
        .unwrap();
    write!(
        cfg,
        "\n[[siem]]\nkind = \"syslog\"\naddress = \"{syslog_addr}\"\n\n[[siem]]\nkind = \"http\"\nurl = \"http://{http_addr}/events\"\n\n[[siem]]\nkind = \"file\"\nformat = \"native\"\npath = \"{}\"\n",
        file.display()
    )
    .unwrap();
    drop(cfg);
    c.start(1).unwrap();
    c.wait_for_leader(&[1], Duration::from_secs(30))
        .await
        .unwrap();
    c.wait_for_resource("local-shell", 3, Duration::from_secs(30))
        .await
        .unwrap();
    let alice = c.mint_token("alice").await.unwrap().token;
    let out = custody(
        &c,
        &[1],
        &alice,
        &["exec", "local-shell", "--", "echo", "siem"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = custody(&c, &[1], "not-a-token", &["whoami"]);
    assert!(!out.status.success());
    let list = custody(&c, &[1], &alice, &["sessions", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let session = list[0]["session_id"].as_str().unwrap().to_owned();

    for (what, seen) in [("syslog", &syslog), ("http", &http)] {
        harness::eventually(Duration::from_secs(20), what, || {
            let seen = seen.clone();
            let session = session.clone();
            async move {
                let events = seen.lock().unwrap().clone();
                find(&events, "session_closed")
                    .iter()
                    .any(|e| e["api"]["request"]["uid"] == session.as_str())
                    && !find(&events, "auth_rejected").is_empty()
            }
        })
        .await;
        let events = seen.lock().unwrap().clone();
        let opened = find(&events, "session_opened")
            .into_iter()
            .find(|e| e["api"]["request"]["uid"] == session.as_str())
            .unwrap_or_else(|| panic!("{what}: no session_opened for {session}"));
        assert_eq!(opened["class_uid"], 6003, "{opened}");
        assert_eq!(opened["category_uid"], 6);
        assert_eq!(opened["type_uid"], 600301);
        assert_eq!(opened["actor"]["user"]["name"], "alice");
        assert_eq!(opened["resources"][0]["name"], "local-shell");
        assert_eq!(opened["metadata"]["version"], "1.1.0");
        let rejected = find(&events, "auth_rejected")[0];
        assert_eq!(rejected["class_uid"], 3002, "{rejected}");
        assert_eq!(rejected["status"], "Failure");
        let accepted = find(&events, "auth_accepted");
        assert!(
            accepted
                .iter()
                .any(|e| e["user"]["name"] == "alice" && e["class_uid"] == 3002),
            "{what}: {accepted:?}"
        );
        // No token and no command line in the stream.
        let all = serde_json::to_string(&events).unwrap();
        assert!(
            !all.contains(&alice) && !all.contains("echo siem"),
            "{what}"
        );
    }
    let lines = std::fs::read_to_string(&file).unwrap();
    let native: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        native
            .iter()
            .any(|e| e["event"] == "session_opened" && e["fields"]["session"] == session.as_str()),
        "{lines}"
    );
    // The export's OCSF form: the session as API Activity.
    let admin = c.mint_token("admin").await.unwrap().token;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("export");
    let out = custody(
        &c,
        &[1],
        &admin,
        &[
            "export",
            "--out",
            out_dir.to_str().unwrap(),
            "--format",
            "jsonl,ocsf",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ocsf = std::fs::read_to_string(out_dir.join("ocsf.jsonl")).unwrap();
    let ocsf: Vec<Value> = ocsf
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let opened = ocsf
        .iter()
        .find(|e| {
            e["api"]["request"]["uid"] == session.as_str()
                && e["api"]["operation"] == "session_opened"
        })
        .unwrap_or_else(|| panic!("{ocsf:?}"));
    assert_eq!(opened["type_uid"], 600301);
    assert_eq!(opened["actor"]["user"]["name"], "alice");
    assert!(ocsf
        .iter()
        .any(|e| e["api"]["request"]["uid"] == session.as_str()
            && e["api"]["operation"] == "command"
            && e["message"] == "echo siem"));
}
