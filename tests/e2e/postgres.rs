//! The PostgreSQL gateway against a real PostgreSQL 15 started here, with
//! psql and pgbench as clients.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use custody_cli::dev::{EdgeSpec, GenOptions};
use custody_proto::pg;

use crate::edge::{custody, text};
use crate::harness::{self, TestCluster};

/// A private PostgreSQL cluster for one test; stopped and removed on drop.
pub struct Postgres {
    inner: custody_cli::localpg::LocalPostgres,
    pub dir: tempfile::TempDir,
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let inner = custody_cli::localpg::LocalPostgres::start(&dir.path().join("pg"))
            .expect("start PostgreSQL");
        Postgres { inner, dir }
    }

    pub fn resource_toml(&self, name: &str, labels: &str) -> String {
        self.inner.resource_toml(name, labels)
    }
}

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: no-unbounded-deletes
    sql: [delete_without_where, truncate]
    decision: deny
  - name: drops-need-review
    sql: [drop]
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
rules:
  - name: engineers-dev-db
    identity: { groups: [engineers] }
    resource: { kinds: [postgres], labels: { env: dev } }
    actions: [connect]
    decision: allow
    guardrails: [no-unbounded-deletes, drops-need-review]
"#;

async fn system(pg: &Postgres) -> TestCluster {
    system_with(pg, POLICY).await
}

async fn system_with(pg: &Postgres, policy: &str) -> TestCluster {
    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(policy, "yaml")
        .await
        .unwrap();
    let mut spec = EdgeSpec::shell("e1", "db");
    spec.resources_toml = pg.resource_toml("db", "env = \"dev\"");
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    c.wait_for_resource("db", 3, Duration::from_secs(20))
        .await
        .unwrap();
    c
}

/// The gateway address of node `id`.
fn pg_port(c: &TestCluster, id: u64) -> u16 {
    let text = std::fs::read_to_string(&c.nodes[&id].config).unwrap();
    let t: toml::Table = toml::from_str(&text).unwrap();
    let a = t["listen"]["postgres"].as_str().unwrap();
    a.rsplit(':').next().unwrap().parse().unwrap()
}

/// libpq settings for the gateway on node `id`, as `token`.
fn libpq(c: &TestCluster, id: u64, token: &str, db: &str, sslmode: &str) -> Vec<(String, String)> {
    vec![
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), pg_port(c, id).to_string()),
        ("PGDATABASE".into(), db.into()),
        ("PGUSER".into(), "custody".into()),
        ("PGPASSWORD".into(), token.into()),
        ("PGSSLMODE".into(), sslmode.into()),
        ("PGCONNECT_TIMEOUT".into(), "10".into()),
    ]
}

fn psql(env: &[(String, String)], sql: &str) -> Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .envs(env.iter().cloned())
        .output()
        .expect("run psql")
}

pub(crate) fn session_events(
    c: &TestCluster,
    token: &str,
    resource: &str,
) -> Vec<serde_json::Value> {
    let out = custody(
        c,
        &[],
        token,
        &["sessions", "list", "--resource", resource, "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut events = Vec::new();
    for s in list.as_array().unwrap() {
        let id = s["session_id"].as_str().unwrap();
        let out = custody(c, &[], token, &["sessions", "show", id, "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        events.extend(v["events"].as_array().unwrap().iter().cloned());
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_work_through_the_gateway_and_every_statement_is_recorded() {
    let pg = Postgres::start();
    // pgbench -i drops and truncates: no guardrails here.
    let unguarded = POLICY
        .split("guardrails:\n  - name: no-unbounded")
        .next()
        .unwrap()
        .to_owned()
        + "rules:\n  - name: engineers-dev-db\n    identity: { groups: [engineers] }\n    resource: { kinds: [postgres] }\n    actions: [connect]\n    decision: allow\n";
    let c = system_with(&pg, &unguarded).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let env = libpq(&c, 2, &alice, "db", "require");

    let out = psql(
        &env,
        "create table items(id int primary key, name text); insert into items values (1, 'apple'), (2, 'pear'); select id, name from items order by id;",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("1|apple\n2|pear\n"),
        "{}",
        text(&out.stdout)
    );
    // A rolled-back transaction changes nothing.
    let out = psql(
        &env,
        "begin; insert into items values (3, 'plum'); rollback;",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&env, "select count(*) from items");
    assert_eq!(text(&out.stdout).trim(), "2");
    // Errors come back as errors.
    let out = psql(&env, "select * from nowhere");
    assert!(
        text(&out.stderr).contains("relation \"nowhere\" does not exist"),
        "{}",
        text(&out.stderr)
    );
    // COPY both ways (psql \copy is COPY FROM STDIN / TO STDOUT).
    let csv = pg.dir.path().join("in.csv");
    std::fs::write(&csv, "10,fig\n11,kiwi\n").unwrap();
    let out = psql(
        &env,
        &format!("\\copy items from '{}' with (format csv)", csv.display()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&env, "\\copy (select id, name from items where id >= 10 order by id) to stdout with (format csv)");
    assert_eq!(text(&out.stdout).trim(), "10,fig\n11,kiwi");

    // pgbench: COPY IN during -i, then the extended and prepared protocols.
    let bench = |args: &[&str]| {
        Command::new("pgbench")
            .args(args)
            .envs(env.iter().cloned())
            .output()
            .expect("run pgbench")
    };
    let out = bench(&["-i", "-s", "1", "-q"]);
    assert!(out.status.success(), "pgbench -i: {}", text(&out.stderr));
    for mode in ["extended", "prepared"] {
        let out = bench(&["-M", mode, "-c", "2", "-t", "20", "-n"]);
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("number of failed transactions: 0"),
            "{}",
            text(&out.stdout)
        );
    }

    // Evidence: statements with parameters, outcomes and rows.
    let events = session_events(&c, &audrey, "db");
    let commands: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["type"] == "command").collect();
    assert!(commands.iter().any(|e| e["event"]["text"]
        .as_str()
        .unwrap()
        .contains("insert into items values (1, 'apple')")));
    let executed = commands
        .iter()
        .find(|e| {
            e["event"]["verb"] == "execute"
                && e["event"]["text"]
                    .as_str()
                    .unwrap()
                    .contains("UPDATE pgbench_accounts")
        })
        .expect("pgbench statements are recorded with their parameters");
    assert_eq!(
        executed["event"]["params"].as_array().unwrap().len(),
        2,
        "{executed}"
    );
    let rows: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "output" && e["event"]["stream"] == "row")
        .map(|e| e["event"]["text"].as_str().unwrap())
        .collect();
    assert!(rows.contains(&"1\tapple"), "{rows:?}");
    let outcomes: Vec<String> = events
        .iter()
        .filter(|e| e["type"] == "outcome")
        .map(|e| {
            format!(
                "{} {}",
                e["event"]["tag"].as_str().unwrap(),
                e["event"]["error"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        outcomes.iter().any(|o| o.starts_with("INSERT 0 2")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|o| o.starts_with("ROLLBACK")),
        "{outcomes:?}"
    );
    assert!(outcomes.iter().any(|o| o.contains("42P01")), "{outcomes:?}");
    assert!(events
        .iter()
        .any(|e| e["type"] == "output" && e["event"]["stream"] == "copy_in"));
    // The database password never leaves the edge.
    let secret = "s3cret-pg-password";
    assert!(!events.iter().any(|e| e.to_string().contains(secret)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_unknown_resources_denials_and_plaintext_never_reach_the_edge() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let refused = |env: Vec<(String, String)>, why: &str| psql_refused(&env, "select 1", why);
    refused(
        libpq(&c, 1, "not-a-token", "db", "require"),
        "valid Custody access token",
    );
    let mut tampered = alice.clone();
    tampered.pop();
    refused(
        libpq(&c, 1, &tampered, "db", "require"),
        "valid Custody access token",
    );
    // Alice's claims, correctly signed, but expired an hour ago.
    let claims = serde_json::json!({
        "iss": "https://dev-issuer.custody.local", "aud": "urn:custody", "sub": "alice",
        "exp": crate::auth::now() - 3600, "iat": crate::auth::now() - 7200,
        "groups": ["engineers"],
    });
    let expired = crate::auth::sign(&c, &claims, Some(&crate::auth::kid_of(&alice)));
    refused(libpq(&c, 1, &expired, "db", "require"), "expired");
    refused(
        libpq(&c, 1, &alice, "nodb", "require"),
        "no resource named \"nodb\"",
    );
    refused(
        libpq(&c, 1, &bob, "db", "require"),
        "no policy rule grants connect",
    );
    refused(libpq(&c, 1, &alice, "db", "disable"), "requires TLS");
    // Nothing reached the edge: no session was recorded.
    let audrey = c.mint_token("audrey").await.unwrap().token;
    assert!(session_events(&c, &audrey, "db").is_empty());

    // Garbage and hostile lengths close the connection; the node lives on.
    use std::io::{Read as _, Write as _};
    let port = pg_port(&c, 1);
    for bytes in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..], // SSLRequest, then garbage
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &b"\x40\x00\x00\x00\x00\x03\x00\x00"[..], // a 1 GB startup length
        &b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"[..], // truncated startup
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(bytes).unwrap();
        if bytes.starts_with(b"\x00\x00\x00\x08\x04\xd2") {
            let _ = s.write_all(b"\xff\xff\xff\xff garbage instead of a TLS hello");
        }
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // A client that goes quiet where the password is due is cut off (it
    // would hold a connection slot), with an error saying why.
    {
        use bytes::BufMut as _;
        use tokio::io::AsyncReadExt as _;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let tls = custody_cli::pg::tls_config(&c.ca_path()).unwrap();
        let mut s = custody_cli::pg::dial_tls(addr, tls).await.unwrap();
        let mut out = bytes::BytesMut::new();
        pg::encode_startup(&[("user", "x"), ("database", "db")], &mut out);
        write_all_flush(&mut s, &out).await;
        let mut buf = bytes::BytesMut::new();
        let asked = read_message(&mut s, &mut buf).await;
        assert_eq!((asked.tag, &asked.body[..]), (b'R', &[0, 0, 0, 3][..]));
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut rest))
            .await
            .expect("the gateway closes a silent connection");
        assert!(started.elapsed() >= Duration::from_secs(10));
        buf.put_slice(&rest);
        let f = pg::split_frame(&mut buf, pg::Limits::default())
            .unwrap()
            .unwrap();
        let n = pg::decode_notice(&f.body).unwrap();
        assert!(
            n.get(b'M').is_some_and(|m| m.contains("no password")),
            "{n:?}"
        );
    }
    let out = psql(&libpq(&c, 1, &alice, "db", "require"), "select 41 + 1");
    assert_eq!(text(&out.stdout).trim(), "42", "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_under_an_access_grant_end_with_it() {
    let pg = Postgres::start();
    let c = system_with(
        &pg,
        r#"
roles:
  admin: { groups: [custody-admins] }
  approver: { groups: [approvers] }
rules:
  - name: db-on-request
    identity: { groups: [engineers] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
"#,
    )
    .await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let out = psql(&libpq(&c, 1, &alice, "db", "require"), "select 1");
    assert!(
        text(&out.stderr).contains("requires approval to connect"),
        "{}",
        text(&out.stderr)
    );
    let grant = |secs: &str| {
        let out = custody(
            &c,
            &[],
            &alice,
            &[
                "access",
                "request",
                "db",
                "--for",
                secs,
                "--reason",
                "incident 7",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let id = text(&out.stdout).trim().to_owned();
        let out = custody(&c, &[], &bob, &["approvals", "approve", &id]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        id
    };
    let query = |sql: &str| {
        let mut out = bytes::BytesMut::new();
        pg::encode_frame(pg::ftag::QUERY, format!("{sql}\0").as_bytes(), &mut out);
        out
    };
    // A session under a 4-second grant works, then is ended when it expires.
    let short = grant("4s");
    let (mut s, mut buf, _) = raw_gateway_session(&c, &alice, 0, &[]).await;
    write_all_flush(&mut s, &query("select 1")).await;
    let mut got = Vec::new();
    while got.last().map(|f: &pg::Frame| f.tag) != Some(b'Z') {
        got.push(read_message(&mut s, &mut buf).await);
    }
    assert!(got.iter().any(|f| f.tag == b'D'), "{got:?}");
    let ended = tokio::time::timeout(Duration::from_secs(15), read_message(&mut s, &mut buf))
        .await
        .expect("the session ends with its grant");
    let n = pg::decode_notice(&ended.body).unwrap();
    assert!(
        n.get(b'M')
            .is_some_and(|m| m.contains(&format!("access grant {short} expired"))),
        "{n:?}"
    );
    // Under a long grant that its requester cancels, the next statement is
    // refused.
    let long = grant("1h");
    let (mut s, mut buf, _) = raw_gateway_session(&c, &alice, 0, &[]).await;
    let out = custody(&c, &[], &alice, &["approvals", "cancel", &long]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    write_all_flush(&mut s, &query("select 1")).await;
    let mut got = Vec::new();
    while got.last().map(|f: &pg::Frame| f.tag) != Some(b'Z') {
        got.push(read_message(&mut s, &mut buf).await);
    }
    refusal_in(&got, "no access grant is in force");
}

/// The ErrorResponse among `got`, which must say `why`.
fn refusal_in(got: &[pg::Frame], why: &str) -> pg::Notice {
    let err = got
        .iter()
        .find(|f| f.tag == b'E')
        .map(|f| pg::decode_notice(&f.body).unwrap())
        .unwrap_or_else(|| panic!("an error saying {why:?}: {got:?}"));
    assert!(err.get(b'M').is_some_and(|m| m.contains(why)), "{err:?}");
    err
}

/// Runs `sql` with psql, which must fail saying `why`.
fn psql_refused(env: &[(String, String)], sql: &str, why: &str) {
    let out = psql(env, sql);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains(why),
        "{sql}: expected {why:?} in {err}"
    );
}

/// psql running `sql` in the background (for statements held for approval).
fn spawn_psql(env: &[(String, String)], sql: &str) -> std::process::Child {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `token` sees a pending approval request; returns its id.
async fn pending_request(c: &TestCluster, token: &str) -> String {
    let mut id = String::new();
    crate::harness::eventually(
        Duration::from_secs(15),
        "a pending approval request",
        || {
            let out = custody(c, &[], token, &["approvals", "list", "--pending", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if let Some(r) = v.as_array().and_then(|a| a.first()) {
                id = r["id"].to_string();
            }
            let found = !id.is_empty();
            async move { found }
        },
    )
    .await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_guardrails_deny_or_hold_statements_for_approval() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let env = libpq(&c, 1, &alice, "db", "require");
    let out = psql(
        &env,
        "create table t(id int); insert into t values (1), (2); create table scratch(x int);",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Denied with SQLSTATE 42501 and the guardrail's name; nothing ran, and
    // the session goes on.
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "DELETE FROM t",
        ])
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("42501") && err.contains("no-unbounded-deletes"),
        "{err}"
    );
    let out = psql(&env, "truncate t");
    assert!(
        text(&out.stderr).contains("no-unbounded-deletes"),
        "{}",
        text(&out.stderr)
    );
    let out = psql(&env, "select count(*) from t");
    assert_eq!(text(&out.stdout).trim(), "2");
    // In one simple-query batch: the statements before the refusal ran.
    let out = Command::new("psql")
        .args(["-X", "-A", "-t"])
        .envs(env.iter().cloned())
        .arg("-c")
        .arg("insert into t values (3)")
        .arg("-c")
        .arg("delete from t")
        .arg("-c")
        .arg("select count(*) from t")
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains('3'),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = psql(&env, "delete from t where id = 3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Statements are read as PostgreSQL reads them: a comment right after
    // an operator cannot hide an unbounded delete from the guardrails.
    psql_refused(
        &env,
        "select 1 >-- '\n0; delete from t --'",
        "no-unbounded-deletes",
    );
    let out = psql(&env, "select count(*) from t");
    assert_eq!(text(&out.stdout).trim(), "2", "nothing was deleted");

    // A drop is held until an approver approves it, then runs once.
    let held = spawn_psql(&env, "drop table scratch");
    let id = pending_request(&c, &bob).await;
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch'",
    );
    assert_eq!(text(&out.stdout).trim(), "1", "held, not run");
    let out = custody(&c, &[], &bob, &["approvals", "approve", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = tokio::task::spawn_blocking(move || held.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(done.status.success(), "{}", text(&done.stderr));
    assert!(
        text(&done.stderr).contains(&format!("approval required: request {id}")),
        "{}",
        text(&done.stderr)
    );
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch'",
    );
    assert_eq!(text(&out.stdout).trim(), "0", "ran after approval");
    let out = custody(&c, &[], &bob, &["approvals", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "used");
    // A denial is final: the statement reports it and does not run.
    let out = psql(&env, "create table scratch2(x int)");
    assert!(out.status.success());
    let held = spawn_psql(&env, "drop table scratch2");
    let id2 = pending_request(&c, &bob).await;
    let out = custody(
        &c,
        &[],
        &bob,
        &["approvals", "deny", &id2, "--reason", "not today"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done = tokio::task::spawn_blocking(move || held.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        text(&done.stderr).contains("denied"),
        "{}",
        text(&done.stderr)
    );
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch2'",
    );
    assert_eq!(text(&out.stdout).trim(), "1");

    // A client that disconnects while its statement is held abandons it:
    // the session ends at once, and a later approval does not run it.
    let out = psql(&env, "create table scratch3(x int)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut held = spawn_psql(&env, "drop table scratch3");
    let id4 = pending_request(&c, &bob).await;
    held.kill().unwrap();
    let _ = held.wait();
    let audrey = c.mint_token("audrey").await.unwrap().token;
    crate::harness::eventually(
        Duration::from_secs(15),
        "the held session's evidence records the disconnect",
        || {
            let found = session_events(&c, &audrey, "db").iter().any(|e| {
                e["type"] == "outcome"
                    && e["event"]["error"].as_str().is_some_and(|m| {
                        m.contains("disconnected while the statement was held")
                            && m.contains(&format!("request {id4}"))
                    })
            });
            async move { found }
        },
    )
    .await;
    let out = custody(&c, &[], &bob, &["approvals", "approve", &id4]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = custody(&c, &[], &bob, &["approvals", "show", &id4, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["status"], "approved",
        "not spent by the abandoned session"
    );
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch3'",
    );
    assert_eq!(text(&out.stdout).trim(), "1", "abandoned, not run");
    // The approval is still good for the same statement, once.
    let out = psql(&env, "drop table scratch3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = custody(&c, &[], &bob, &["approvals", "show", &id4, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "used");

    // A client that does not wait (PGOPTIONS) gets an error with the request
    // id at once; asking again finds the same request; once approved, the
    // same statement runs, once.
    let mut nowait = env.clone();
    nowait.push(("PGOPTIONS".into(), "-c custody.no_wait=on".into()));
    let out = psql(&nowait, "drop table scratch2");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("not waiting") && err.contains("approval required: request"),
        "{err}"
    );
    let id3 = err
        .split("request ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_owned();
    assert_ne!(id3, id2, "a denied request is not reused");
    let again = psql(&nowait, "drop table scratch2");
    assert!(
        text(&again.stderr).contains(&format!("request {id3} ")),
        "{}",
        text(&again.stderr)
    );
    let out = custody(&c, &[], &bob, &["approvals", "list", "--pending", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "one request: {v}");
    // custody exec --sql --no-wait: exit 254 with the same request.
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "db", "--no-wait", "--sql", "drop table scratch2"],
    );
    assert_eq!(out.status.code(), Some(254), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("request {id3} ")));
    let out = custody(&c, &[], &bob, &["approvals", "approve", &id3]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&nowait, "drop table scratch2");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch2'",
    );
    assert_eq!(text(&out.stdout).trim(), "0", "ran after approval");
    let out = custody(&c, &[], &bob, &["approvals", "show", &id3, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "used");

    // A refused statement inside an extended-protocol sequence whose first
    // statement already went to the server: answered in order (the first
    // statement's rows, then 42501 in place of the second), and the session
    // goes on.
    let local = connect(&c, &alice, "db").await;
    let mut wire = RawPg::connect(local.1).await;
    let mut batch = Vec::new();
    for sql in ["select count(*) from t", "delete from t"] {
        batch.push(RawPg::parse(sql));
        batch.push(RawPg::bind());
        batch.push(RawPg::execute());
    }
    batch.push((pg::ftag::SYNC, vec![]));
    let got = wire.exchange(&batch).await;
    let tags: Vec<char> = got.iter().map(|f| f.tag as char).collect();
    assert_eq!(tags, ['1', '2', 'D', 'C', 'E', 'Z'], "{got:?}");
    let err = pg::decode_notice(&got[4].body).unwrap();
    assert_eq!(err.get(b'C'), Some("42501"));
    assert!(
        err.get(b'M')
            .is_some_and(|m| m.contains("no-unbounded-deletes")),
        "{err:?}"
    );
    let got = wire
        .exchange(&[(pg::ftag::QUERY, b"select count(*) from t\0".to_vec())])
        .await;
    let row = got.iter().find(|f| f.tag == b'D').expect("a row");
    assert_eq!(
        pg::decode_data_row(&row.body).unwrap()[0].as_deref(),
        Some(&b"2"[..])
    );
    // The evidence has the refusal, and no execution of the refused statement
    // (the server skipped it; the gateway did not even send it).
    drop(wire);
    drop(local);
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let events = session_events(&c, &audrey, "db");
    assert!(events.iter().any(|e| e["type"] == "outcome"
        && e["event"]["error"]
            .as_str()
            .is_some_and(|m| m.contains("42501") && m.contains("no-unbounded-deletes"))));
    assert!(
        !events
            .iter()
            .any(|e| e["event"]["verb"] == "execute" && e["event"]["text"] == "delete from t"),
        "a refused statement recorded as executed"
    );

    // Statements that run other statements are judged by what they run: a
    // data-modifying WITH, EXPLAIN ANALYZE, and a PREPARE that would need
    // an approval for each later EXECUTE.
    for sql in [
        "WITH x AS (SELECT 1) DELETE FROM t",
        "with d as (delete from t returning *) select count(*) from d",
        "EXPLAIN ANALYZE DELETE FROM t",
    ] {
        psql_refused(&env, sql, "no-unbounded-deletes");
    }
    // PostgreSQL cannot prepare a DROP: the server refuses it with its own
    // syntax error, read the same way by the gateway's parser.
    psql_refused(
        &env,
        "PREPARE p AS DROP TABLE t",
        "syntax error at or near \"DROP\"",
    );
    let out = psql(&env, "select count(*) from t");
    assert_eq!(text(&out.stdout).trim(), "2", "nothing was deleted");

    // One approval, one execution: a statement prepared (protocol Parse) on
    // an approval runs once; binding it again is refused, so the table made
    // again after the first run stays. It must be the unnamed statement,
    // which SQL EXECUTE cannot reach.
    let out = psql(&env, "create table scratch5(x int)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let local = connect(&c, &alice, "db").await;
    let mut wire = RawPg::connect_with(local.1, &[("options", "-c custody.no_wait=on")]).await;
    let got = wire
        .exchange(&[
            RawPg::parse_named("d", "drop table if exists scratch5"),
            (pg::ftag::SYNC, vec![]),
        ])
        .await;
    let err = pg::decode_notice(&got[0].body).unwrap();
    assert!(
        err.get(b'M')
            .is_some_and(|m| m.contains("must be prepared as the unnamed statement")),
        "{err:?}"
    );
    let prepare = [
        RawPg::parse("drop table if exists scratch5"),
        (pg::ftag::SYNC, vec![]),
    ];
    let got = wire.exchange(&prepare).await;
    let err = pg::decode_notice(&got[0].body).unwrap();
    let msg = err.get(b'M').unwrap_or_default().to_owned();
    let id5 = msg
        .split("approval required: request ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("a request id in {msg:?}"))
        .to_owned();
    let out = custody(&c, &[], &bob, &["approvals", "approve", &id5]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = wire.exchange(&prepare).await;
    let tags: Vec<char> = got.iter().map(|f| f.tag as char).collect();
    assert_eq!(tags, ['1', 'Z'], "{got:?}");
    let run = [RawPg::bind(), RawPg::execute(), (pg::ftag::SYNC, vec![])];
    // The gateway's own Close after the Execute is answered to it, not to
    // the client.
    let got = wire.exchange(&run).await;
    let tags: Vec<char> = got.iter().map(|f| f.tag as char).collect();
    assert_eq!(tags, ['2', 'C', 'Z'], "{got:?}");
    let out = psql(&env, "create table scratch5(x int)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = wire.exchange(&run).await;
    let tags: Vec<char> = got.iter().map(|f| f.tag as char).collect();
    assert_eq!(tags, ['E', 'Z'], "{got:?}");
    let err = pg::decode_notice(&got[0].body).unwrap();
    assert_eq!(err.get(b'C'), Some("42501"));
    assert!(
        err.get(b'M')
            .is_some_and(|m| m.contains(&format!("approval request {id5} covered one execution"))),
        "{err:?}"
    );
    let out = psql(
        &env,
        "select count(*) from pg_tables where tablename = 'scratch5'",
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "1",
        "the second execution did not run"
    );
    // The session goes on.
    let got = wire
        .exchange(&[(pg::ftag::QUERY, b"select 1\0".to_vec())])
        .await;
    assert!(got.iter().any(|f| f.tag == b'D'), "{got:?}");

    // Names the gateway did not see prepared (SQL DEALLOCATE, then PREPARE
    // under the same name) are refused at Bind: what they return cannot be
    // told.
    let got = wire
        .exchange(&[
            RawPg::parse_named("s", "select 1"),
            (pg::ftag::SYNC, vec![]),
        ])
        .await;
    assert_eq!(got[0].tag, b'1', "{got:?}");
    for q in ["DEALLOCATE s", "PREPARE s AS SELECT count(*) FROM t"] {
        let got = wire
            .exchange(&[(pg::ftag::QUERY, format!("{q}\0").into_bytes())])
            .await;
        assert!(got.iter().all(|f| f.tag != b'E'), "{q}: {got:?}");
    }
    let got = wire
        .exchange(&[
            RawPg::bind_named("s"),
            RawPg::execute(),
            (pg::ftag::SYNC, vec![]),
        ])
        .await;
    let err = pg::decode_notice(&got[0].body).unwrap();
    assert_eq!(err.get(b'C'), Some("42501"), "{got:?}");
    assert!(
        err.get(b'M')
            .is_some_and(|m| m.contains("unknown to the gateway")),
        "{err:?}"
    );

    // A setting changed by a statement sent in the same write is in force
    // when the next statement is read: with standard_conforming_strings
    // turned off first, the gateway reads the backslash as the server does,
    // and the delete it hides is refused by the guardrail: nothing is
    // deleted.
    use tokio::io::AsyncWriteExt as _;
    let mut out = bytes::BytesMut::new();
    for q in [
        "SET standard_conforming_strings = off",
        "SELECT '\\' AS a, ' ; DELETE FROM t; --'",
    ] {
        pg::encode_frame(pg::ftag::QUERY, format!("{q}\0").as_bytes(), &mut out);
    }
    wire.s.write_all(&out).await.unwrap();
    let first = wire.until_ready().await;
    assert!(first.iter().all(|f| f.tag != b'E'), "{first:?}");
    let second = wire.until_ready().await;
    refusal_in(&second, "no-unbounded-deletes");
    // A client encoding whose characters can hold ASCII bytes (SJIS) would
    // let PostgreSQL read non-ASCII text differently: refused until UTF8.
    for (q, refused) in [
        ("SET client_encoding = 'SJIS'", false),
        ("select 'caf\u{e9}'", true),
        ("select 1", false),
        ("SET client_encoding = 'UTF8'", false),
        ("select 'caf\u{e9}'", false),
    ] {
        let got = wire
            .exchange(&[(pg::ftag::QUERY, format!("{q}\0").into_bytes())])
            .await;
        let err = got.iter().find(|f| f.tag == b'E');
        assert_eq!(err.is_some(), refused, "{q}: {got:?}");
        if let Some(e) = err {
            let n = pg::decode_notice(&e.body).unwrap();
            assert!(
                n.get(b'M')
                    .is_some_and(|m| m.contains("client_encoding SJIS")),
                "{n:?}"
            );
        }
    }
    let out = psql(&env, "select count(*) from t");
    assert_eq!(text(&out.stdout).trim(), "2", "nothing was deleted");
}

/// A hand-driven protocol client (plaintext, for `custody connect`).
struct RawPg {
    s: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawPg {
    async fn connect(port: u16) -> Self {
        Self::connect_with(port, &[]).await
    }

    /// Connects with more startup parameters.
    async fn connect_with(port: u16, extra: &[(&str, &str)]) -> Self {
        use tokio::io::AsyncWriteExt as _;
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut me = RawPg {
            s,
            buf: bytes::BytesMut::new(),
        };
        let mut out = bytes::BytesMut::new();
        let mut params = vec![("user", "x"), ("database", "db")];
        params.extend_from_slice(extra);
        pg::encode_startup(&params, &mut out);
        me.s.write_all(&out).await.unwrap();
        me.until_ready().await;
        me
    }

    fn parse(sql: &str) -> (u8, Vec<u8>) {
        let mut b = vec![0];
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        (pg::ftag::PARSE, b)
    }

    fn bind() -> (u8, Vec<u8>) {
        (pg::ftag::BIND, vec![0, 0, 0, 0, 0, 0, 0, 0])
    }

    fn parse_named(name: &str, sql: &str) -> (u8, Vec<u8>) {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        (pg::ftag::PARSE, b)
    }

    /// Binds the unnamed portal to `statement`.
    fn bind_named(statement: &str) -> (u8, Vec<u8>) {
        let mut b = vec![0];
        b.extend_from_slice(statement.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        (pg::ftag::BIND, b)
    }

    fn execute() -> (u8, Vec<u8>) {
        (pg::ftag::EXECUTE, vec![0, 0, 0, 0, 0])
    }

    /// Sends `frames` at once and returns everything up to ReadyForQuery.
    async fn exchange(&mut self, frames: &[(u8, Vec<u8>)]) -> Vec<pg::Frame> {
        use tokio::io::AsyncWriteExt as _;
        let mut out = bytes::BytesMut::new();
        for (tag, body) in frames {
            pg::encode_frame(*tag, body, &mut out);
        }
        self.s.write_all(&out).await.unwrap();
        self.until_ready().await
    }

    async fn until_ready(&mut self) -> Vec<pg::Frame> {
        use tokio::io::AsyncReadExt as _;
        let mut got = Vec::new();
        loop {
            while let Some(f) = pg::split_frame(&mut self.buf, pg::Limits::default()).unwrap() {
                let done = f.tag == b'Z';
                got.push(f);
                if done {
                    return got;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.s.read_buf(&mut self.buf))
                .await
                .expect("an answer within 20 s")
                .unwrap();
            assert!(n > 0, "the connection closed: {got:?}");
        }
    }
}

/// psql straight to the real server (seeding data the gateway must mask).
pub(crate) fn psql_direct(pg: &Postgres, sql: &str) -> Output {
    psql(&pg.inner.direct_env(), sql)
}

pub(crate) fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            hits.extend(grep_dir(&p, needle));
        } else if let Ok(b) = std::fs::read(&p) {
            if b.windows(needle.len()).any(|w| w == needle) {
                hits.push(p);
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_masked_for_the_client_and_in_the_evidence() {
    let pg = Postgres::start();
    let out = psql_direct(
        &pg,
        "create table customers(id int, name text, email text, card text, customer_ssn text, note text, card_num bigint); \
         insert into customers values (1, 'Alice', 'alice@example.com', '4111 1111 1111 1111', '123-45-6789', 'iban DE89 3704 0044 0532 0130 00 from 10.1.2.3', 4111111111111111); \
         create schema vault; create table vault.accounts(owner text, pin text); \
         insert into vault.accounts values ('Alice', 'PIN-8876-ZQ'); \
         create view vault.codes as select owner, pin as code from vault.accounts; \
         create view vault.owners as select owner from vault.accounts; \
         create view public.nested as select * from vault.codes",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let policy = POLICY.replace(
        "    guardrails: [no-unbounded-deletes, drops-need-review]\n",
        "    guardrails: [no-unbounded-deletes, drops-need-review]\n    mask: [pii]\n",
    ) + "masking:\n  - name: pii\n    detectors: [credit_card, email, us_ssn, iban, ip]\n    columns: [\"*ssn*\", \"vault.accounts.pin\"]\n";
    let c = system_with(&pg, &policy).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let env = libpq(&c, 1, &alice, "db", "require");
    let out = psql(
        &env,
        "select id, name, email, card, customer_ssn, note, card_num from customers",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "1|Alice|[email]|[credit_card]|****|iban [iban] from [ip]|",
        "text-format results are masked (a card number in a bigint becomes NULL)"
    );
    // A table column rule follows the column through aliases; a computed
    // column has no table behind it (RowDescription), so it is masked when
    // its expression reads a masked column (its statement, when the result
    // columns are not plainly the select list).
    for (sql, want) in [
        (
            "select owner, pin, pin as p, 'PIN-0000-AA' as pin from vault.accounts",
            "Alice|****|****|PIN-0000-AA",
        ),
        (
            "select upper(pin), owner || '' from vault.accounts",
            "****|Alice",
        ),
        (
            "select count(*), max(length(pin)) from vault.accounts",
            "1|",
        ),
        (
            "select upper(owner) from (select owner, pin from vault.accounts) s",
            "****",
        ),
        ("select (select max(pin) from vault.accounts)", "****"),
        // A Unicode-escaped name is read as the server reads it: `pin`.
        ("select U&\"p\\0069n\" || '' from vault.accounts", "****"),
        ("select row_to_json(a) from vault.accounts a", "****"),
        // A column-name rule follows the source column through an alias.
        ("select customer_ssn as x from customers", "****"),
        // A view reading a masked column is masked whole; one that does not
        // is not.
        ("select * from vault.codes", "****|****"),
        ("select * from vault.owners", "Alice"),
        ("select * from nested", "****|****"),
        // Computed from a view's columns: masked when the view (or one it
        // reads) reads a masked column.
        ("select upper(code) from vault.codes", "****"),
        ("select lower(code) from nested", "****"),
        ("select upper(owner) from vault.owners", "ALICE"),
        // Columns renamed by an alias list, `TABLE`, and rows from a prepared
        // statement or a cursor (whose text the gateway does not see there).
        ("select upper(x) from vault.accounts a(o, x)", "****"),
        ("select row_to_json(t) from (table vault.accounts) t", "****"),
        ("with s(o, x) as (table vault.accounts) select upper(x) from s", "****"),
        ("select upper(x) from (select 'a' o, 'b' x union all table vault.accounts) s", "****\n****"),
        ("prepare p as select upper(pin) from vault.accounts; execute p", "PREPARE\n****"),
        // Functions that run SQL text or read a relation named by a value.
        ("select query_to_xml('select pin from vault.accounts', true, false, '')::text", "****"),
        ("select owner, table_to_xml('vault.accounts', true, false, '')::text from vault.accounts", "Alice|****"),
        ("begin; declare c cursor for select upper(pin) from vault.accounts; fetch all c; commit", "BEGIN\nDECLARE CURSOR\n****\nCOMMIT"),
    ] {
        let out = psql(&env, sql);
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), want, "{sql}");
    }
    // psql's own catalog queries still work (some do not parse here: plain
    // reads are let through, their computed columns masked as opaque).
    let out = psql(&env, "\\d vault.accounts");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("pin"), "{}", text(&out.stdout));
    // Backslash escapes would make the gateway misread statements.
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "set standard_conforming_strings = off",
            "-c",
            "select 1",
        ])
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("standard_conforming_strings is off"),
        "{}",
        text(&out.stderr)
    );
    // Errors and notifications answering a statement that reads masked
    // columns may quote their values: their texts are withheld.
    let out = psql(&env, "select pin::int from vault.accounts");
    let err = text(&out.stderr);
    assert!(
        err.contains("withheld under column masking") && !err.contains("PIN-8876"),
        "{err}"
    );
    let out = psql(
        &env,
        "listen c; select pg_notify('c', owner) from vault.accounts; select 1",
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("withheld under column masking") && !all.contains("Alice"),
        "{all}"
    );
    // Masked data may not be copied out of its columns (a copy under another
    // name would no longer be masked), nor its table reshaped.
    for sql in [
        "create table vault.copy as select * from vault.accounts",
        "create table vault.copy as select upper(pin) as x from vault.accounts",
        "select owner, pin into vault.copy from vault.accounts",
        "alter table vault.accounts rename column pin to p",
        "create table vault.copy as select * from vault.codes",
        "create table vault.copy as table vault.accounts",
        "create view vault.v2 as select owner from vault.accounts",
        "alter schema vault rename to v2",
        "/* select */ do $$ begin execute 'crea' || 'te table vault.c as select pin from vault.accounts'; end $$",
        "with m as (insert into vault.accounts select pin, pin from vault.accounts returning 1) select count(*) from m",
        // Functions that keep their arguments where a later read finds them.
        "select set_config('custody.x', pin, false) from vault.accounts",
        "select pg_notify('c', pin) from vault.accounts",
    ] {
        psql_refused(&env, sql, "refused under column masking");
    }
    let out = psql(
        &env,
        "create table vault.names as select owner from vault.accounts",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&env, "select * from vault.names");
    assert_eq!(text(&out.stdout).trim(), "Alice", "{}", text(&out.stderr));
    let out = psql_direct(
        &pg,
        "select count(*) from pg_tables where tablename = 'copy'",
    );
    assert_eq!(text(&out.stdout).trim(), "0", "nothing was copied");
    // What the client sends is masked in the evidence too.
    let out = psql(
        &env,
        "select id from customers where email = 'alice@example.com'",
    );
    assert_eq!(text(&out.stdout).trim(), "1", "{}", text(&out.stderr));
    // Prepared statements with binary results, run out of order: each
    // execution is masked by its own statement's columns.
    {
        let local = connect(&c, &alice, "db").await;
        let client = pg_client(local.1).await;
        let pin = client
            .prepare("select pin from vault.accounts")
            .await
            .unwrap();
        let owner = client
            .prepare("select owner, 'x' as pin from vault.accounts")
            .await
            .unwrap();
        let email = client
            .prepare("select email, card_num from customers")
            .await
            .unwrap();
        for _ in 0..2 {
            let r = client.query_one(&pin, &[]).await.unwrap();
            assert_eq!(r.get::<_, String>(0), "****");
            let r = client.query_one(&owner, &[]).await.unwrap();
            assert_eq!(r.get::<_, String>(0), "Alice");
            assert_eq!(r.get::<_, String>(1), "x");
            let r = client.query_one(&email, &[]).await.unwrap();
            assert_eq!(r.get::<_, String>(0), "[email]");
            assert_eq!(
                r.get::<_, Option<i64>>(1),
                None,
                "a binary bigint card number is refused (NULL)"
            );
        }
    }
    // Values that come back inside errors and notifications are masked too.
    let out = psql(&env, "select card::int from customers");
    let err = text(&out.stderr);
    assert!(
        err.contains("[credit_card]") && !err.contains("4111"),
        "{err}"
    );
    let out = psql(
        &env,
        "listen c; select pg_notify('c', email) from customers; select 1",
    );
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("withheld under column masking") && !all.contains("alice@"),
        "under column rules every notification payload is withheld: {all}"
    );
    // A function call (fastpath) could run any SQL unchecked: refused in
    // order, and the session goes on.
    {
        let local = connect(&c, &alice, "db").await;
        let mut wire = RawPg::connect(local.1).await;
        let mut call = 1598i32.to_be_bytes().to_vec(); // any function's OID
        call.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let got = wire.exchange(&[(b'F', call)]).await;
        let tags: Vec<char> = got.iter().map(|f| f.tag as char).collect();
        assert_eq!(tags, ['E', 'Z'], "{got:?}");
        let err = pg::decode_notice(&got[0].body).unwrap();
        assert_eq!(err.get(b'C'), Some("42501"));
        assert!(err
            .get(b'M')
            .is_some_and(|m| m.contains("function-call protocol")));
        let got = wire
            .exchange(&[(pg::ftag::QUERY, b"select 1\0".to_vec())])
            .await;
        assert!(got.iter().any(|f| f.tag == b'D'), "{got:?}");
    }
    // COPY TO under column masking is refused; COPY of a query is masked.
    let out = psql(&env, "\\copy customers to stdout");
    assert!(
        text(&out.stderr).contains("refused under column masking"),
        "{}",
        text(&out.stderr)
    );

    // A statement held for approval reaches the approver masked, as the
    // evidence holds it.
    let mut nowait = env.clone();
    nowait.push(("PGOPTIONS".into(), "-c custody.no_wait=on".into()));
    let out = psql(
        &nowait,
        "drop table if exists old_customers -- asked for by alice@example.com",
    );
    assert!(
        text(&out.stderr).contains("approval required: request"),
        "{}",
        text(&out.stderr)
    );
    let bob = c.mint_token("bob").await.unwrap().token;
    let id = pending_request(&c, &bob).await;
    let out = custody(&c, &[], &bob, &["approvals", "show", &id, "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["command"], "drop table if exists old_customers -- asked for by [email]",
        "{shown}"
    );

    let secrets = [
        "alice@example.com",
        "4111 1111 1111 1111",
        "123-45-6789",
        "DE89 3704",
        "10.1.2.3",
        "PIN-8876-ZQ",
    ];
    let events = session_events(&c, &audrey, "db");
    assert!(
        events.iter().any(|e| e["type"] == "output"),
        "rows are recorded"
    );
    assert!(
        events.iter().any(|e| e["type"] == "command"
            && e["event"]["text"] == "select id from customers where email = '[email]'"),
        "the statement is recorded, masked"
    );
    for e in &events {
        let s = e.to_string();
        for secret in secrets {
            assert!(!s.contains(secret), "evidence holds {secret:?}: {s}");
        }
    }
    for secret in secrets {
        let hits = grep_dir(&c.dir, secret.as_bytes());
        assert!(hits.is_empty(), "{secret:?} found in {hits:?}");
    }

    // A session masks by the profiles it started with: once the policy
    // masks more (here the name column), its statements are refused until
    // it reconnects, and a new session masks by the new profile.
    let local = connect(&c, &alice, "db").await;
    let mut wire = RawPg::connect(local.1).await;
    let name_of_1 = (
        pg::ftag::QUERY,
        b"select name from customers where id = 1\0".to_vec(),
    );
    let got = wire.exchange(std::slice::from_ref(&name_of_1)).await;
    let row = got.iter().find(|f| f.tag == b'D').expect("a row");
    assert_eq!(
        pg::decode_data_row(&row.body).unwrap()[0].as_deref(),
        Some(&b"Alice"[..])
    );
    let got = wire
        .exchange(&[
            RawPg::parse_named("n", "select name from customers where id = 1"),
            (pg::ftag::SYNC, vec![]),
        ])
        .await;
    assert_eq!(got[0].tag, b'1', "{got:?}");
    c.client(&[])
        .unwrap()
        .policy_apply(&policy.replace("\"*ssn*\"", "\"*ssn*\", \"name\""), "yaml")
        .await
        .unwrap();
    crate::harness::eventually(
        Duration::from_secs(15),
        "the policy change reaches the gateway",
        || {
            let out = psql(&env, "select name from customers where id = 1");
            let masked = text(&out.stdout).trim() == "****";
            async move { masked }
        },
    )
    .await;
    let got = wire.exchange(&[name_of_1]).await;
    assert!(got.iter().all(|f| f.tag != b'D'), "{got:?}");
    refusal_in(&got, "reconnect");
    // So is a statement prepared before the change, at its Bind.
    let got = wire
        .exchange(&[
            RawPg::bind_named("n"),
            RawPg::execute(),
            (pg::ftag::SYNC, vec![]),
        ])
        .await;
    assert!(got.iter().all(|f| f.tag != b'D'), "{got:?}");
    let err = pg::decode_notice(&got[0].body).unwrap();
    assert!(
        err.get(b'M').is_some_and(|m| m.contains("reconnect")),
        "{err:?}"
    );
    // And run through SQL EXECUTE.
    let got = wire
        .exchange(&[(pg::ftag::QUERY, b"EXECUTE n\0".to_vec())])
        .await;
    assert!(got.iter().all(|f| f.tag != b'D'), "{got:?}");
    let err = pg::decode_notice(&got[0].body).unwrap();
    assert!(
        err.get(b'M').is_some_and(|m| m.contains("reconnect")),
        "{err:?}"
    );
}

/// `custody connect` on a free local port, as `token`; killed on drop.
struct Connect(std::process::Child, u16);

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(c: &TestCluster, token: &str, resource: &str) -> Connect {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = crate::edge::custody_cmd(
        c,
        &[],
        token,
        &["connect", resource, "--port", &port.to_string()],
    )
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "custody connect did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Connect(child, port)
}

/// A tokio-postgres client through `custody connect` on `port` (user and
/// database names are the connect's business: it injects the resource).
async fn pg_client(port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=x dbname=ignored"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect through custody connect");
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_library_works_through_custody_connect_including_cancel() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let local = connect(&c, &alice, "db").await;
    let client = pg_client(local.1).await;

    // Another local user cannot use the listener (it would act with
    // alice's token). Running a client as another user needs root, which CI
    // has; elsewhere this check says so and moves on.
    if custody_cli::pg::my_uid() == Some(0) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-X", "-A", "-t"])
            .arg(format!(
                "host=127.0.0.1 port={} dbname=db sslmode=disable",
                local.1
            ))
            .args(["-c", "select 1"])
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains("serves only the user who started it"),
            "{err}"
        );
    } else {
        eprintln!("not root: the other-user check of custody connect is not run here");
    }

    // Typed parameters and binary results (tokio-postgres uses both).
    let row = client
        .query_one(
            "select $1::int8 + 1 as n, upper($2::text) as s, true as b",
            &[&41i64, &"abc"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>("n"), 42);
    assert_eq!(row.get::<_, String>("s"), "ABC");
    assert!(row.get::<_, bool>("b"));
    // A prepared statement, run twice.
    client
        .batch_execute("create table kv(k int primary key, v text)")
        .await
        .unwrap();
    let insert = client
        .prepare("insert into kv values ($1, $2)")
        .await
        .unwrap();
    for (k, v) in [(1, "one"), (2, "two")] {
        client.execute(&insert, &[&k, &v]).await.unwrap();
    }
    // A transaction rolled back.
    {
        let mut client = client;
        let tx = client.transaction().await.unwrap();
        tx.execute("delete from kv where k = $1", &[&1i32])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let n: i64 = client
            .query_one("select count(*) from kv", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2);

        // Cancel: the long query ends with 57014 well before it would finish.
        let token = client.cancel_token();
        let sleeper = tokio::spawn(async move {
            let r = client.query("select pg_sleep(30)", &[]).await;
            (r.map(|_| ()), client)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("send the cancel");
        let (r, _client) = tokio::time::timeout(Duration::from_secs(20), sleeper)
            .await
            .expect("the cancelled query returns")
            .unwrap();
        let e = r.expect_err("cancelled");
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{e}"
        );
    }

    // `custody exec --sql` for scripts: JSON and CSV.
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "db",
            "--sql",
            "select k, v from kv order by k",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["rows"],
        serde_json::json!([{"k": "1", "v": "one"}, {"k": "2", "v": "two"}])
    );
    let out = custody(
        &c,
        &[],
        &alice,
        &[
            "exec",
            "db",
            "--sql",
            "select v from kv order by k",
            "--csv",
        ],
    );
    assert_eq!(text(&out.stdout), "v\none\ntwo\n");
    let out = custody(
        &c,
        &[],
        &alice,
        &["exec", "db", "--sql", "select * from nowhere"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("42P01"), "{}", text(&out.stderr));
}

/// A CA, and a server certificate for 127.0.0.1 it signed: (CA PEM, cert
/// PEM, key PEM).
fn db_certificates() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_reaches_the_database_over_verified_tls() {
    use std::os::unix::fs::PermissionsExt as _;
    let pg = Postgres::start();
    let data = pg.inner.dir.join("data");
    // The server: TLS on, and plaintext TCP logins refused.
    let (ca, cert, key) = db_certificates();
    std::fs::write(data.join("server.crt"), cert).unwrap();
    std::fs::write(data.join("server.key"), key).unwrap();
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    if custody_cli::localpg::is_root() {
        for f in ["server.crt", "server.key"] {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(data.join(f))
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }
    let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("hostnossl all all all reject\n{hba}"),
    )
    .unwrap();
    let out = psql_direct(&pg, "alter system set ssl = on");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql_direct(&pg, "select pg_reload_conf()");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ca_file = pg.dir.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let (other_ca, _, _) = db_certificates();
    let other_ca_file = pg.dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();

    let (mut c, _) = harness::started(GenOptions::default()).await;
    c.client(&[])
        .unwrap()
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    let tls = |mode: &str, ca: &Path| {
        format!("sslmode = \"{mode}\"\nsslrootcert = \"{}\"\n", ca.display())
    };
    let mut spec = EdgeSpec::shell("e1", "db");
    spec.resources_toml = [
        pg.resource_toml("db", "env = \"dev\"") + &tls("verify-full", &ca_file),
        pg.resource_toml("db-plain", "env = \"dev\"") + "sslmode = \"disable\"\n",
        pg.resource_toml("db-wrong-ca", "env = \"dev\"") + &tls("verify-ca", &other_ca_file),
    ]
    .concat();
    c.add_edge(&spec).unwrap();
    c.enroll_edge("e1").await.unwrap();
    for r in ["db", "db-plain", "db-wrong-ca"] {
        c.wait_for_resource(r, 3, Duration::from_secs(20))
            .await
            .unwrap();
    }
    let alice = c.mint_token("alice").await.unwrap().token;
    // Verified TLS: the server sees an encrypted session.
    let out = psql(
        &libpq(&c, 1, &alice, "db", "require"),
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "t");
    // Cancel travels over TLS too.
    let local = connect(&c, &alice, "db").await;
    let client = pg_client(local.1).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.query("select pg_sleep(30)", &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancelled promptly")
        .unwrap();
    assert_eq!(
        r.unwrap_err().code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    // Plaintext is refused by the server; a certificate from another CA is
    // refused by the edge. Both say why.
    let out = psql(&libpq(&c, 1, &alice, "db-plain", "require"), "select 1");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no encryption"),
        "{}",
        text(&out.stderr)
    );
    let out = psql(&libpq(&c, 1, &alice, "db-wrong-ca", "require"), "select 1");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");
}

/// A TLS session straight to node 1's gateway, started with protocol 3.
/// `minor` and `extra` startup parameters; returns the stream and every
/// message up to the first ReadyForQuery.
async fn raw_gateway_session(
    c: &TestCluster,
    token: &str,
    minor: i32,
    extra: &[(&str, &str)],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    bytes::BytesMut,
    Vec<pg::Frame>,
) {
    use bytes::BufMut as _;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg_port(c, 1)).parse().unwrap();
    let tls = custody_cli::pg::tls_config(&c.ca_path()).unwrap();
    let mut s = custody_cli::pg::dial_tls(addr, tls).await.unwrap();
    let mut body = bytes::BytesMut::new();
    body.put_i32((3 << 16) | minor);
    for (k, v) in [("user", "x"), ("database", "db")].iter().chain(extra) {
        for part in [k, v] {
            body.put_slice(part.as_bytes());
            body.put_u8(0);
        }
    }
    body.put_u8(0);
    let mut out = bytes::BytesMut::new();
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    write_all_flush(&mut s, &out).await;
    loop {
        let f = read_message(&mut s, &mut buf).await;
        let password = f.tag == b'R' && f.body[..] == [0, 0, 0, 3];
        let done = f.tag == b'Z';
        got.push(f);
        if password {
            let mut out = bytes::BytesMut::new();
            pg::encode_frame(b'p', format!("{token}\0").as_bytes(), &mut out);
            write_all_flush(&mut s, &out).await;
        }
        if done {
            return (s, buf, got);
        }
    }
}

async fn write_all_flush<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, b: &[u8]) {
    use tokio::io::AsyncWriteExt as _;
    s.write_all(b).await.unwrap();
    s.flush().await.unwrap();
}

async fn read_message<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut bytes::BytesMut,
) -> pg::Frame {
    use tokio::io::AsyncReadExt as _;
    loop {
        if let Some(f) = pg::split_frame(buf, pg::Limits::default()).unwrap() {
            return f;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read_buf(buf))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "the connection closed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_gets_long_cancel_keys_and_newer_versions_are_negotiated_down() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;

    // 3.2: spoken as is (no NegotiateProtocolVersion), with a 32-byte
    // cancel key that cancels a running statement.
    let (mut s, mut buf, greeting) = raw_gateway_session(&c, &alice, 2, &[]).await;
    assert!(!greeting.iter().any(|f| f.tag == b'v'), "{greeting:?}");
    let key = greeting
        .iter()
        .find(|f| f.tag == b'K')
        .expect("BackendKeyData");
    assert_eq!(key.body.len(), 4 + 32);
    let pid = i32::from_be_bytes(key.body[..4].try_into().unwrap());
    let mut out = bytes::BytesMut::new();
    pg::encode_frame(b'Q', b"select pg_sleep(30)\0", &mut out);
    write_all_flush(&mut s, &out).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", pg_port(&c, 1)).parse().unwrap();
    let tls = custody_cli::pg::tls_config(&c.ca_path()).unwrap();
    let mut cancel = custody_cli::pg::dial_tls(addr, tls).await.unwrap();
    let mut out = bytes::BytesMut::new();
    pg::encode_cancel(pid, &key.body[4..], &mut out);
    write_all_flush(&mut cancel, &out).await;
    let started = std::time::Instant::now();
    let err = loop {
        let f = read_message(&mut s, &mut buf).await;
        if f.tag == b'E' {
            break pg::decode_notice(&f.body).unwrap();
        }
    };
    assert_eq!(err.get(b'C'), Some("57014"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // 3.7 with an unknown protocol option: told 3.2 and the option first,
    // then the session works.
    let (mut s, mut buf, greeting) =
        raw_gateway_session(&c, &alice, 7, &[("_pq_.compression", "on")]).await;
    let v = &greeting[0];
    assert_eq!(v.tag, b'v', "{greeting:?}");
    assert_eq!(&v.body[..8], &[0, 0, 0, 2, 0, 0, 0, 1]);
    assert_eq!(&v.body[8..], b"_pq_.compression\0");
    let mut out = bytes::BytesMut::new();
    pg::encode_frame(b'Q', b"select 40 + 2\0", &mut out);
    write_all_flush(&mut s, &out).await;
    let row = loop {
        let f = read_message(&mut s, &mut buf).await;
        if f.tag == b'D' {
            break f;
        }
    };
    assert_eq!(
        pg::decode_data_row(&row.body).unwrap()[0].as_deref(),
        Some(&b"42"[..])
    );

    // 3.0 keeps 4-byte keys.
    let (_, _, greeting) = raw_gateway_session(&c, &alice, 0, &[]).await;
    let key = greeting.iter().find(|f| f.tag == b'K').unwrap();
    assert_eq!(key.body.len(), 8);

    // custody connect speaks 3.0 on its local hop and says so to a 3.2 client.
    let local = connect(&c, &alice, "db").await;
    let mut t = tokio::net::TcpStream::connect(("127.0.0.1", local.1))
        .await
        .unwrap();
    let mut startup = vec![0u8; 4];
    startup.extend_from_slice(&pg::PROTOCOL_3_2.to_be_bytes());
    startup.extend_from_slice(b"user\0x\0database\0db\0\0");
    let len = (startup.len() as i32).to_be_bytes();
    startup[..4].copy_from_slice(&len);
    write_all_flush(&mut t, &startup).await;
    let mut buf = bytes::BytesMut::new();
    let v = read_message(&mut t, &mut buf).await;
    assert_eq!((v.tag, &v.body[..]), (b'v', &[0, 0, 0, 0, 0, 0, 0, 0][..]));
    loop {
        let f = read_message(&mut t, &mut buf).await;
        assert_ne!(f.tag, b'E', "{f:?}");
        if f.tag == b'K' {
            assert_eq!(f.body.len(), 8);
        }
        if f.tag == b'Z' {
            break;
        }
    }
}

/// Several clients reading large results at once through `custody connect`
/// (TLS to the gateway): every result arrives whole. A gateway that left the
/// tail of a response in its TLS buffer hung clients exactly like this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_results_all_arrive() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let local = connect(&c, &alice, "db").await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        let port = local.1;
        clients.push(tokio::spawn(async move {
            let client = pg_client(port).await;
            let mut rows = 0;
            for i in 0..20i64 {
                let r = client
                    .query(
                        "select g, repeat('x', 100) from generate_series(1, 2000 + $1::int8) g",
                        &[&i],
                    )
                    .await
                    .unwrap();
                assert_eq!(r.len() as i64, 2000 + i);
                rows += r.len();
            }
            rows
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut n = 0;
        for c in clients {
            n += c.await.unwrap();
        }
        n
    })
    .await
    .expect("every result within 120 s");
    assert_eq!(all, 6 * (20 * 2000 + 190));
}

/// A client that pipelines more than every buffer on the path holds — large
/// statements in, large results out — while reading as it writes (what
/// libpq's pipeline mode does) gets every answer. A gateway that stopped
/// relaying the server's answers while it waited to send the client's next
/// bytes deadlocked here: the server blocked on its output, so it stopped
/// reading, so the tunnel filled, so the gateway waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_pipeline_does_not_deadlock() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let local = connect(&c, &alice, "db").await;
    let wire = RawPg::connect(local.1).await;
    let (mut rd, mut wr) = wire.s.into_split();
    const QUERIES: usize = 120;
    const RESULT: usize = 400_000;
    // Each statement carries 128 KiB of comment and returns 400 kB.
    let padding = "-".repeat(128 << 10);
    let mut batch = bytes::BytesMut::new();
    for i in 0..QUERIES {
        let sql = format!("select {i}, repeat('x', {RESULT}) /* {padding} */\0");
        pg::encode_frame(pg::ftag::QUERY, sql.as_bytes(), &mut batch);
    }
    let writer = tokio::spawn(async move {
        wr.write_all(&batch).await.unwrap();
        wr
    });
    let reader = tokio::spawn(async move {
        let mut buf = bytes::BytesMut::new();
        let (mut rows, mut ready, mut bytes) = (0, 0, 0);
        while ready < QUERIES {
            match pg::split_frame(&mut buf, pg::Limits::default()).unwrap() {
                Some(f) => match f.tag {
                    b'D' => {
                        rows += 1;
                        bytes += f.body.len();
                    }
                    b'Z' => ready += 1,
                    b'E' => panic!("{:?}", pg::decode_notice(&f.body)),
                    _ => {}
                },
                None => {
                    let n = rd.read_buf(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway closed after {ready} answers");
                }
            }
        }
        (rows, bytes)
    });
    let (rows, bytes) = tokio::time::timeout(Duration::from_secs(180), reader)
        .await
        .expect("every answer of the pipeline within 180 s")
        .unwrap();
    assert_eq!(rows, QUERIES);
    assert!(bytes >= QUERIES * RESULT);
    let _ = writer.await.unwrap();
}

/// A single 20 MiB value through psql, both ways: selected (a 20 MiB
/// DataRow, recorded up to the 16 MiB default cap with the cut recorded) and
/// sent (a 20 MiB statement, recorded in full as fragments). Every reader
/// works for that session and for every other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_value_is_recorded_and_every_reader_works() {
    let pg = Postgres::start();
    let c = system(&pg).await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let audrey = c.mint_token("audrey").await.unwrap().token;
    let env = libpq(&c, 1, &alice, "db", "require");
    const N: usize = 20 << 20;
    let out = psql(&env, &format!("select repeat('x', {N})"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim_end().len(), N);
    // A statement as large, sent by the client.
    // (From a file: one argument of a command line holds 128 KiB at most.)
    let big_literal = "y".repeat(N);
    let sql = pg.dir.path().join("big.sql");
    std::fs::write(&sql, format!("select length('{big_literal}');\n")).unwrap();
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f"])
        .arg(&sql)
        .envs(env.iter().cloned())
        .output()
        .expect("run psql");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), N.to_string());
    let out = psql(&env, "select 'small'");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let list = custody(
        &c,
        &[],
        &audrey,
        &["sessions", "list", "--resource", "db", "--json"],
    );
    assert!(list.status.success(), "{}", text(&list.stderr));
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
    let reader = c
        .client_as(&[], Duration::from_secs(30), Some(audrey.clone()))
        .unwrap();
    // The selected value: rows recorded up to the cap, the cut recorded.
    let first = reader.get_session(&ids[0]).await.unwrap();
    let rows: Vec<&custody_proto::evidence::v1::Output> = first
        .events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(custody_proto::evidence::v1::event::Kind::Output(o)) if o.stream == "row" => {
                Some(o)
            }
            _ => None,
        })
        .collect();
    let recorded: usize = rows.iter().map(|o| o.data.len()).sum();
    assert_eq!(recorded, 16 << 20, "recorded up to the 16 MiB cap");
    assert!(rows.last().unwrap().truncated, "the cut is recorded");
    assert!(rows[1..].iter().all(|o| o.continued));
    // The sent statement: in full, as fragments that join back.
    let second = reader.get_session(&ids[1]).await.unwrap();
    let joined = custody_proto::chain::join_fragments(second.events.clone());
    assert!(joined.len() < second.events.len(), "recorded as fragments");
    let text_of = joined.iter().find_map(|e| match &e.kind {
        Some(custody_proto::evidence::v1::event::Kind::Command(cmd)) if cmd.text.len() > N => {
            Some(cmd.text.clone())
        }
        _ => None,
    });
    assert!(text_of.unwrap().contains(&big_literal));
    for id in &ids {
        let show = custody(&c, &[], &audrey, &["sessions", "show", id]);
        assert!(show.status.success(), "{}", text(&show.stderr));
        let replay = custody(
            &c,
            &[],
            &audrey,
            &["sessions", "replay", id, "--speed", "1000000"],
        );
        assert!(replay.status.success(), "{}", text(&replay.stderr));
    }
    let status = custody(&c, &[], &audrey, &["cluster", "status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let key = st["evidence_public_key"].as_str().unwrap().to_owned();
    let dir = pg.dir.path().join("export");
    let out = custody(
        &c,
        &[],
        &audrey,
        &["export", "--out", dir.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = custody(
        &c,
        &[],
        "",
        &["verify", dir.to_str().unwrap(), "--public-key", &key],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The example policy's agent rule is read-only through the real gateway:
/// the `agent` machine identity reads, and its `UPDATE … WHERE` is refused
/// by the guardrail and never reaches the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_agent_rule_refuses_an_update_with_where() {
    let pg = Postgres::start();
    let setup = "rules:\n  - name: setup\n    identity: { groups: [engineers] }\n    resource: { kinds: [postgres] }\n    actions: [connect]\n    decision: allow\n";
    let c = system_with(
        &pg,
        &(POLICY.split("guardrails:").next().unwrap().to_owned() + setup),
    )
    .await;
    let alice = c.mint_token("alice").await.unwrap().token;
    let out = psql(
        &libpq(&c, 1, &alice, "db", "require"),
        "create table orders(id int primary key, total int); insert into orders values (1, 40);",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.client(&[])
        .unwrap()
        .policy_apply(include_str!("../../examples/policy.yaml"), "yaml")
        .await
        .unwrap();

    let agent = c.mint_token("agent").await.unwrap().token;
    let env = libpq(&c, 2, &agent, "db", "require");
    let out = psql(&env, "select total from orders where id = 1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "40");
    let out = psql(&env, "update orders set total = 0 where id = 1");
    assert!(!out.status.success(), "the agent's update ran");
    assert!(
        text(&out.stderr).contains("read-only-sql"),
        "{}",
        text(&out.stderr)
    );
    let out = psql(
        &libpq(&c, 1, &alice, "db", "require"),
        "select total from orders where id = 1",
    );
    assert_eq!(text(&out.stdout).trim(), "40", "{}", text(&out.stderr));
}

/// Live PostgreSQL sessions end when their authority does: as exec
/// sessions (see `edge::sessions_end_with_their_authority`), with psql as
/// the client, the token as its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_postgres_sessions_end_with_their_authority() {
    let pg = Postgres::start();
    let mut c = system(&pg).await;
    let start = |c: &TestCluster, via: u64, tok: &str, _n: u32| {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-c", "select pg_sleep(60)"])
            .envs(libpq(c, via, tok, "db", "require"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    crate::edge::sessions_end_with_their_authority(
        &mut c,
        POLICY,
        start,
        |_| "alice".into(),
        "pg_sleep",
    )
    .await;
}

/// Policy for [`sql_is_judged_by_postgres_own_parser`]: admins connect with
/// no guardrail and no masking; engineers under the demo's destructive-
/// statement guardrail; the agent read-only.
const PARSER_POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  approver: { groups: [approvers] }
guardrails:
  - name: destructive-statements
    sql: [drop, truncate, delete_without_where, update_without_where]
    decision: require_approval
    approval: { groups: [approvers], count: 1 }
  - name: read-only-sql
    sql: [write, ddl, dcl, unparsed]
    decision: deny
rules:
  - name: admins-plain
    identity: { groups: [custody-admins] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
  - name: engineers-guarded
    identity: { groups: [engineers] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
    guardrails: [destructive-statements]
  - name: agents-read-only
    identity: { groups: [ai-agents] }
    resource: { kinds: [postgres] }
    actions: [connect]
    decision: allow
    guardrails: [read-only-sql]
"#;

/// psql's output for `cmds` (each a `-c`), stdout and stderr together.
fn psql_all(env: &[(String, String)], cmds: &[&str]) -> String {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.envs(env.iter().cloned()).output().expect("run psql");
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Statements are judged by PostgreSQL's own parser: without rules they
/// give what the server gives directly (its errors and warnings included,
/// large objects through the function-call protocol too); under
/// guardrails, comment-like text in a literal is a read and a delete in a
/// WITH is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_judged_by_postgres_own_parser() {
    let pg = Postgres::start();
    let c = system_with(&pg, PARSER_POLICY).await;
    let admin = c.mint_token("admin").await.unwrap().token;
    let gw = libpq(&c, 1, &admin, "db", "require");
    let direct = pg.inner.direct_env();
    for (i, env) in [&gw, &direct].into_iter().enumerate() {
        let out = psql(
            env,
            &format!("CREATE FUNCTION bs{i}() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN E'a\\\\b' || 'c\\d'; END $$"),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    for cmds in [
        &["SELECT xml '<!-- hi--> <a/>'"][..],
        &["SELECT ts_headline('english', '<p>The quick <!-- a note --> fox</p>', to_tsquery('english', 'fox'))"],
        &["SELECT 2 >-- the comment starts here\n 1"],
        &["SELECT U&'d\\0061t'"],
        &["SET standard_conforming_strings = off", "SELECT U&'d\\0061t'"],
        &["SET standard_conforming_strings = off", "SELECT 'a\\'b'"],
        &["SELECT 1 +"],
    ] {
        let through = psql_all(&gw, cmds);
        assert_eq!(through, psql_all(&direct, cmds), "{cmds:?}");
        assert!(!through.contains("42501"), "{cmds:?}: {through}");
    }
    let bodies = psql_all(&gw, &["SELECT bs0() = bs1(), bs0()"]);
    assert_eq!(bodies.trim(), "t|a\\bc\\d", "{bodies}");

    // Large objects through psql's \lo_ commands (the function-call
    // protocol), recorded by function name.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let out = psql_all(&gw, &[&format!("\\lo_import {}", src.display())]);
    let oid: u32 = out
        .trim()
        .strip_prefix("lo_import ")
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let back = dir.path().join("out.bin");
    let out = psql_all(&gw, &[&format!("\\lo_export {oid} {}", back.display())]);
    assert!(out.contains("lo_export"), "{out}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let out = psql_all(&gw, &[&format!("\\lo_unlink {oid}")]);
    assert!(out.contains(&format!("lo_unlink {oid}")), "{out}");
    let out = psql(
        &direct,
        &format!("SELECT count(*) FROM pg_largeobject_metadata WHERE oid = {oid}"),
    );
    assert_eq!(text(&out.stdout).trim(), "0");
    let evidence = serde_json::to_string(&session_events(&c, &admin, "db")).unwrap();
    for f in [
        "pg_catalog.lowrite(",
        "pg_catalog.loread(",
        "pg_catalog.lo_unlink(",
    ] {
        assert!(evidence.contains(f), "{f} is not in the evidence");
    }

    // Under guardrails: the same literal is a read; a delete inside a WITH
    // is held for approval.
    let alice = c.mint_token("alice").await.unwrap().token;
    let bob = c.mint_token("bob").await.unwrap().token;
    let env = libpq(&c, 1, &alice, "db", "require");
    let out = psql(
        &env,
        "CREATE TABLE t(id int); INSERT INTO t VALUES (1), (2)",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = psql(&env, "SELECT xml '<!-- hi--> <a/>'");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut held = spawn_psql(&env, "WITH x AS (DELETE FROM t RETURNING *) SELECT 1");
    let id = pending_request(&c, &bob).await;
    assert!(!id.is_empty());
    let _ = held.kill();
    let _ = held.wait();
    let out = psql(&direct, "SELECT count(*) FROM t");
    assert_eq!(text(&out.stdout).trim(), "2", "nothing was deleted");

    // Read-only: a large object can be read, not written.
    let agent = c.mint_token("agent").await.unwrap().token;
    let env = libpq(&c, 1, &agent, "db", "require");
    let out = psql_all(&env, &[&format!("\\lo_import {}", src.display())]);
    assert!(out.contains("read-only-sql"), "{out}");
    let out = psql_all(&gw, &[&format!("\\lo_import {}", src.display())]);
    let oid: u32 = out
        .trim()
        .strip_prefix("lo_import ")
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    let back2 = dir.path().join("out2.bin");
    let out = psql_all(&env, &[&format!("\\lo_export {oid} {}", back2.display())]);
    assert!(out.contains("lo_export"), "{out}");
    assert_eq!(std::fs::read(&back2).unwrap(), data);
}
