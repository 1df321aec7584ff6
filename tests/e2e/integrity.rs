//! Evidence integrity: no value too large to read back, recorded or ended
//! when the cluster cannot commit, keys nobody else can claim, and exports
//! that prove their own completeness.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use custody_cli::client::Client;
use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_proto::evidence::v1 as ev;
use custody_proto::v1 as api;

use crate::edge::{custody, text};
use crate::evidence::copy_dir;
use crate::harness::{self, eventually, TestCluster};

const POLICY: &str = include_str!("../../examples/policy.yaml");

/// A cluster with one edge serving `async-shell` and `strict-shell`.
async fn system(opts: GenOptions) -> TestCluster {
    let (mut c, _) = harness::started(opts).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "async-shell");
    spec.resources_toml = [("async-shell", "async"), ("strict-shell", "strict")]
        .iter()
        .map(|(name, mode)| {
            format!(
                "[[resources]]\nname = \"{name}\"\nkind = \"shell\"\nlabels = {{ env = \"dev\", evidence = \"{mode}\" }}\n"
            )
        })
        .collect();
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in ["async-shell", "strict-shell"] {
        c.wait_for_resource(r, 3, Duration::from_secs(20))
            .await
            .unwrap();
    }
    c
}

/// What a streamed session gave its caller.
#[derive(Debug, Default)]
struct Streamed {
    sid: Option<String>,
    stdout: Vec<u8>,
    result: Option<Result<i32, String>>,
}

/// Runs `script` on `resource` through `client`, keeping what it printed
/// (up to `keep` bytes; the rest is counted in `seen`).
async fn stream(
    client: Arc<Client>,
    resource: &str,
    script: &str,
    keep: usize,
    seen: Arc<std::sync::atomic::AtomicU64>,
) -> Streamed {
    let argv: Vec<String> = vec!["sh".into(), "-c".into(), script.into()];
    let mut got = Streamed::default();
    let (tx, mut out) = match client.exec_open(resource, &argv).await {
        Ok(x) => x,
        Err(e) => {
            got.result = Some(Err(e.to_string()));
            return got;
        }
    };
    let _ = tx
        .send(api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        })
        .await;
    loop {
        match out.message().await {
            Ok(Some(m)) => match m.kind {
                Some(api::exec_output::Kind::Started(s)) => got.sid = Some(s.session_id),
                Some(api::exec_output::Kind::Stdout(b)) => {
                    seen.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    if got.stdout.len() < keep {
                        got.stdout.extend_from_slice(&b);
                    }
                }
                Some(api::exec_output::Kind::Exit(x)) => {
                    got.result = Some(Ok(x.code));
                    return got;
                }
                _ => {}
            },
            Ok(None) => {
                got.result = Some(Err("ended without exit".into()));
                return got;
            }
            Err(s) => {
                got.result = Some(Err(s.message().to_owned()));
                return got;
            }
        }
    }
}

fn stdout_of(events: &[ev::Event]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        if let Some(ev::event::Kind::Output(o)) = &e.kind {
            if o.stream == "stdout" {
                out.extend_from_slice(&o.data);
            }
        }
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn public_key(c: &TestCluster, token: &str) -> String {
    let status = custody(c, &[], token, &["cluster", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    st["evidence_public_key"].as_str().unwrap().to_owned()
}

fn export(c: &TestCluster, token: &str, dir: &Path, extra: &[&str]) {
    let mut args = vec!["export", "--out", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = custody(c, &[], token, &args);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
}

fn verify(c: &TestCluster, dir: &Path, key: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["verify", dir.to_str().unwrap(), "--public-key", key];
    args.extend_from_slice(extra);
    custody(c, &[], "", &args)
}

fn session_id_of(out: &std::process::Output) -> String {
    text(&out.stderr)
        .split("custody: session ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_line_of_output_is_recorded_and_every_reader_works() {
    let c = system(GenOptions::default()).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    const N: usize = 20 << 20;
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "async-shell",
            "--",
            "sh",
            "-c",
            &format!("head -c {N} /dev/zero | tr '\\0' x"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), N);
    let sid = session_id_of(&out);
    // A small session beside it, which every reader must still serve.
    let small = custody(
        &c,
        &[],
        &alice,
        &["exec", "async-shell", "--", "echo", "small"],
    );
    assert!(small.status.success(), "{}", text(&small.stderr));

    let got = c
        .client_as(&[], Duration::from_secs(30), Some(audrey.clone()))
        .unwrap()
        .get_session(&sid)
        .await
        .unwrap();
    let recorded = stdout_of(&got.events);
    assert_eq!(recorded.len(), N, "recorded in full (under the 64 MiB cap)");
    assert!(recorded.iter().all(|b| *b == b'x'));
    let outputs: Vec<&ev::Output> = got
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(ev::event::Kind::Output(o)) => Some(o),
            _ => None,
        })
        .collect();
    assert!(outputs
        .iter()
        .all(|o| o.data.len() <= custody_proto::chain::MAX_EVENT_DATA));
    assert!(got.session.unwrap().closed);

    let show = custody(&c, &[], &audrey, &["sessions", "show", &sid, "--json"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let replay = custody(
        &c,
        &[],
        &audrey,
        &["sessions", "replay", &sid, "--speed", "1000000"],
    );
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    assert!(replay.stdout.len() >= N, "replay prints the output");

    let key = public_key(&c, &audrey);
    let dir = c.dir.join("big-export");
    export(&c, &audrey, &dir, &[]);
    let ok = verify(&c, &dir, &key, &[]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "custody-export-v2");
    let states: Vec<&str> = m["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["closed", "closed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_ends_async_and_strict_sessions_and_records_their_end() {
    let mut c = system(GenOptions::default()).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    // Every session goes through node 1, which loses its quorum.
    let client = Arc::new(
        c.client_as(&[1], Duration::from_secs(20), Some(alice.clone()))
            .unwrap(),
    );
    let ticker = "i=0; while :; do i=$((i+1)); echo line-$i; sleep 0.005; done";
    let flood = "yes 0123456789012345678901234567890123456789012345678901234567890123456789";
    let seen_flood = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (resource, script, keep) in [
        ("async-shell", ticker, usize::MAX),
        ("strict-shell", ticker, usize::MAX),
        ("async-shell", flood, 0),
    ] {
        let client = client.clone();
        let seen = if keep == 0 {
            seen_flood.clone()
        } else {
            Arc::new(Default::default())
        };
        tasks.push(tokio::spawn(async move {
            stream(client, resource, script, keep, seen).await
        }));
    }
    // All three are streaming.
    eventually(Duration::from_secs(20), "the flood streams", || {
        let seen = seen_flood.clone();
        async move { seen.load(std::sync::atomic::Ordering::Relaxed) > 8 << 20 }
    })
    .await;
    let pid = c.nodes[&1].pid().unwrap();
    let before = rss_kib(pid);
    let stopped = Instant::now();
    c.stop(2).unwrap();
    c.stop(3).unwrap();
    // The outage outlasts the recorder's deadline; sample node 1's RSS.
    let mut peak = before;
    let mut results = Vec::new();
    let sampler = async {
        loop {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = sampler => unreachable!(),
        r = async {
            let mut out = Vec::new();
            for t in tasks.drain(..) {
                out.push(t.await.unwrap());
            }
            out
        } => results = r,
        _ = tokio::time::sleep(Duration::from_secs(90)) => {}
    }
    assert_eq!(
        results.len(),
        3,
        "every session ended within 90 s of losing quorum"
    );
    let outage = stopped.elapsed();
    eprintln!(
        "node 1 RSS: {} MiB before the outage, peak {} MiB during it; sessions ended after {outage:?}",
        before / 1024,
        peak / 1024
    );
    for r in &results {
        let err = r.result.clone().unwrap().unwrap_err();
        assert!(
            err.contains("evidence could not be committed"),
            "a clear error: {err}"
        );
    }
    // Bounded: a session holds at most 8 MiB of uncommitted events, and
    // the flood alone would have added gigabytes.
    assert!(
        peak < before + (256 << 10),
        "RSS grew from {before} KiB to {peak} KiB during the outage"
    );

    c.start(2).unwrap();
    c.start(3).unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();
    let reader = c
        .client_as(&[], Duration::from_secs(30), Some(audrey.clone()))
        .unwrap();
    for (k, r) in results.iter().enumerate().take(2) {
        let sid = r.sid.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let got = loop {
            match reader.get_session(&sid).await {
                Ok(g) if g.session.as_ref().is_some_and(|s| s.closed) => break Some(g),
                _ if Instant::now() > deadline => break None,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        let got = got.expect("the session's end is recorded once the cluster is back");
        let info = got.session.unwrap();
        assert!(
            info.close_reason
                .contains("evidence could not be committed"),
            "session {k}: {}",
            info.close_reason
        );
        // Every event up to the end, none after: exactly what the caller saw.
        let recorded = stdout_of(&got.events);
        assert!(!recorded.is_empty());
        assert_eq!(
            String::from_utf8_lossy(&recorded),
            String::from_utf8_lossy(&r.stdout),
            "session {k}: the evidence holds what the caller received"
        );
        let last = got.events.last().unwrap();
        assert!(matches!(last.kind, Some(ev::event::Kind::Closed(_))));
        for (i, e) in got.events.iter().enumerate() {
            assert_eq!(e.seq, i as u64);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leader_kills_during_a_long_async_session_lose_nothing() {
    let mut c = system(GenOptions::default()).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(10))
        .await
        .unwrap();
    // The session's gateway is a follower; the leader is killed under it.
    let gateway = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let client = Arc::new(
        c.client_as(&[gateway], Duration::from_secs(30), Some(alice))
            .unwrap(),
    );
    const LINES: usize = 3000;
    let script =
        format!("i=0; while [ $i -lt {LINES} ]; do i=$((i+1)); echo line-$i; sleep 0.01; done");
    let task = tokio::spawn({
        let client = client.clone();
        async move {
            stream(
                client,
                "async-shell",
                &script,
                usize::MAX,
                Arc::new(Default::default()),
            )
            .await
        }
    });
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut l = c
            .wait_for_leader(&[], Duration::from_secs(20))
            .await
            .unwrap();
        if l == gateway {
            // Move leadership off the gateway first.
            let r = c
                .client_as(&[gateway], Duration::from_secs(20), Some(admin.clone()))
                .unwrap()
                .step_down()
                .await
                .unwrap();
            l = r.leader_id;
        }
        assert_ne!(l, gateway);
        eprintln!("round {round}: killing leader {l}");
        c.kill(l).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.start(l).unwrap();
    }
    let r = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the session finishes")
        .unwrap();
    assert_eq!(r.result, Some(Ok(0)), "the session was not ended");
    let expected: String = (1..=LINES).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&r.stdout), expected);
    let got = client.get_session(&r.sid.unwrap()).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&stdout_of(&got.events)),
        expected,
        "every line recorded once, in order"
    );
    assert!(got.session.unwrap().closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_under_evidence_like_keys_change_no_recording() {
    let c = system(GenOptions::default()).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let admin = c.mint_token("admin").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let client = Arc::new(
        c.client_as(&[], Duration::from_secs(20), Some(alice))
            .unwrap(),
    );
    // A session that waits before it prints, so its chunk keys are known
    // while they are still unused.
    let script = "sleep 2; i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo line-$i; done";
    let (tx, mut out) = client
        .exec_open("async-shell", &["sh".into(), "-c".into(), script.into()])
        .await
        .unwrap();
    let _ = tx
        .send(api::ExecInput {
            kind: Some(api::exec_input::Kind::StdinEof(true)),
        })
        .await;
    let sid = match out.message().await.unwrap().unwrap().kind {
        Some(api::exec_output::Kind::Started(s)) => s.session_id,
        other => panic!("{other:?}"),
    };
    let kv = c
        .client_as(&[], Duration::from_secs(20), Some(admin))
        .unwrap();
    for i in 0..8 {
        for idem in [format!("{sid}/{i}"), format!("ev/{sid}/{i}")] {
            kv.put_with_key(&format!("ev/{sid}/{i}"), b"x".to_vec(), &idem)
                .await
                .unwrap();
        }
    }
    let mut stdout = Vec::new();
    loop {
        match out.message().await.unwrap().and_then(|m| m.kind) {
            Some(api::exec_output::Kind::Stdout(b)) => stdout.extend_from_slice(&b),
            Some(api::exec_output::Kind::Exit(x)) => {
                assert_eq!(x.code, 0);
                break;
            }
            Some(_) => {}
            None => panic!("ended without exit"),
        }
    }
    let expected: String = (1..=200).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&stdout), expected);
    let got = c
        .client_as(&[], Duration::from_secs(20), Some(audrey.clone()))
        .unwrap()
        .get_session(&sid)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&stdout_of(&got.events)), expected);
    assert!(got.session.unwrap().closed);
    let key = public_key(&c, &audrey);
    let dir = c.dir.join("kv-export");
    export(&c, &audrey, &dir, &[]);
    assert!(verify(&c, &dir, &key, &[]).status.success());
}

fn sha256_hex(b: &[u8]) -> String {
    use ring::digest;
    custody_proto::export::hex(digest::digest(&digest::SHA256, b).as_ref())
}

/// Rewrites an export as its own exporter could: drops the lines
/// `drop_lines` picks from the chunks and events (not the ledger, which is
/// the cluster's), lets `edit`
/// change the manifest, fixes the digests and signs with `pkcs8`.
fn forge(
    dir: &Path,
    drop_lines: &dyn Fn(&str) -> bool,
    edit: &dyn Fn(&mut serde_json::Value),
    pkcs8: &[u8],
) {
    for f in ["chunks.jsonl", "events.jsonl"] {
        let p = dir.join(f);
        let kept: String = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .filter(|l| !drop_lines(l))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(p, kept).unwrap();
    }
    let p = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut m);
    for f in m["files"].as_array_mut().unwrap() {
        let name = f["name"].as_str().unwrap().to_owned();
        let b = std::fs::read(dir.join(&name)).unwrap();
        f["sha256"] = sha256_hex(&b).into();
        f["bytes"] = (b.len() as u64).into();
    }
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(&p, &bytes).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8).unwrap();
    let sig = base64::engine::general_purpose::STANDARD.encode(pair.sign(&bytes).as_ref());
    std::fs::write(dir.join("manifest.sig"), sig).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_proves_exports_complete_and_names_what_is_missing() {
    let c = system(GenOptions::default()).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let run = |what: &str| {
        let out = custody(
            &c,
            &[],
            &alice,
            &[
                "exec",
                "async-shell",
                "--",
                "sh",
                "-c",
                &format!("echo {what}; echo more"),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        session_id_of(&out)
    };
    let sids: Vec<String> = (0..3).map(|i| run(&format!("first-{i}"))).collect();
    let key = public_key(&c, &audrey);
    let a = c.dir.join("a");
    export(&c, &audrey, &a, &[]);
    let ok = verify(&c, &a, &key, &[]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(
        text(&ok.stdout).contains("evidence ledger entries 1.."),
        "{}",
        text(&ok.stdout)
    );

    let cluster_key = base64::engine::general_purpose::STANDARD
        .decode(
            std::fs::read_to_string(c.dir.join("evidence-key.b64"))
                .unwrap()
                .trim(),
        )
        .unwrap();
    let rng = ring::rand::SystemRandom::new();
    let other_key = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let victim = sids[1].clone();
    let remove_victim = |m: &mut serde_json::Value| {
        m["sessions"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["session_id"] != victim.as_str());
    };
    let drop_victim = |l: &str| l.contains(&format!("\"session_id\":\"{victim}\""));
    let csv_without = |d: &Path| {
        let p = d.join("sessions.csv");
        let kept: String = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with(&victim))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(p, kept).unwrap();
    };
    let fails_naming = |d: &Path, name: &str, what: &str| {
        let out = verify(&c, d, &key, &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{what}: verify passed");
        assert!(err.contains(name), "{what}: the error names {name}: {err}");
        eprintln!("{what}: {}", err.trim());
    };

    // One session left out of every file, re-signed by the cluster's own
    // key (an exporter that omits it): the ledger names it.
    let d = c.dir.join("omitted");
    copy_dir(&a, &d);
    csv_without(&d);
    forge(&d, &drop_victim, &remove_victim, &cluster_key);
    fails_naming(&d, &victim, "a session left out");
    // The same, re-signed by another key.
    let d = c.dir.join("foreign");
    copy_dir(&a, &d);
    csv_without(&d);
    forge(&d, &drop_victim, &remove_victim, other_key.as_ref());
    fails_naming(&d, &victim, "re-signed by another key");
    assert!(text(&verify(&c, &d, &key, &[]).stderr).contains("signature"));
    // A chain cut short: its last chunk gone, the manifest made to agree.
    let d = c.dir.join("cut");
    copy_dir(&a, &d);
    let chunks = std::fs::read_to_string(a.join("chunks.jsonl")).unwrap();
    let victim_chunks: Vec<serde_json::Value> = chunks
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["session_id"] == victim.as_str())
        .collect();
    let last = victim_chunks.last().unwrap().clone();
    let keep_head = victim_chunks
        .get(victim_chunks.len().wrapping_sub(2))
        .map(|v| v["sha256"].clone());
    let last_index = last["index"].as_u64().unwrap();
    forge(
        &d,
        &|l| {
            l.contains(&format!("\"session_id\":\"{victim}\""))
                && l.contains(&format!("\"index\":{last_index},"))
        },
        &|m| {
            for s in m["sessions"].as_array_mut().unwrap() {
                if s["session_id"] == victim.as_str() {
                    s["chunks"] = last_index.into();
                    s["state"] = "open".into();
                    s["closed"] = false.into();
                    if let Some(h) = &keep_head {
                        s["chain_head"] = h.clone();
                    }
                }
            }
        },
        &cluster_key,
    );
    fails_naming(&d, &victim, "a chain cut short");
    // A session the export says it could not read is named, and the rest
    // still verifies.
    let d = c.dir.join("unreadable");
    copy_dir(&a, &d);
    let events_of_victim =
        |l: &str| l.contains(&format!("\"session_id\":\"{victim}\"")) && !l.contains("zstd_b64");
    forge(
        &d,
        &events_of_victim,
        &|m| {
            for s in m["sessions"].as_array_mut().unwrap() {
                if s["session_id"] == victim.as_str() {
                    s["state"] = "unreadable".into();
                    s["unreadable"] = "chunk 0 claims 9437251 raw bytes".into();
                }
            }
        },
        &cluster_key,
    );
    let out = verify(&c, &d, &key, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("UNREADABLE: session {victim}")),
        "{}",
        text(&out.stdout)
    );

    // Two successive exports link; one that skips an export does not.
    let z = run("between");
    let b = c.dir.join("b");
    export(&c, &audrey, &b, &["--after", a.to_str().unwrap()]);
    let mb: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("manifest.json")).unwrap()).unwrap();
    assert!(
        mb["sessions"].to_string().contains(&z),
        "{}",
        mb["sessions"]
    );
    assert!(
        !mb["sessions"].to_string().contains(&sids[0]),
        "already exported"
    );
    let ok = verify(&c, &b, &key, &["--previous", a.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    run("later");
    let cdir = c.dir.join("c");
    export(&c, &audrey, &cdir, &["--after", b.to_str().unwrap()]);
    assert!(
        verify(&c, &cdir, &key, &["--previous", b.to_str().unwrap()])
            .status
            .success()
    );
    // Against a, the export skips b's range, where session z was recorded.
    let out = verify(&c, &cdir, &key, &["--previous", a.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("may be missing"),
        "{}",
        text(&out.stderr)
    );
}

/// An export written by the previous release (format v1, before the
/// ledger), committed with its public key, still verifies and says what it
/// cannot prove.
#[test]
fn a_v1_export_from_before_the_ledger_still_verifies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/export-v1");
    let key = std::fs::read_to_string(dir.join("public-key.b64")).unwrap();
    let bins = custody_cli::dev::Binaries::locate().unwrap();
    let out = std::process::Command::new(&bins.custody)
        .args(["verify", dir.to_str().unwrap(), "--public-key", key.trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("custody-export-v1: it has no evidence ledger"),
        "{}",
        text(&out.stdout)
    );
    // Tampering is still caught.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&dir, tmp.path());
    let p = tmp.path().join("events.jsonl");
    let s = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\"seq\":1", "\"seq\":9", 1);
    std::fs::write(p, s).unwrap();
    let out = std::process::Command::new(&bins.custody)
        .args([
            "verify",
            tmp.path().to_str().unwrap(),
            "--public-key",
            key.trim(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
