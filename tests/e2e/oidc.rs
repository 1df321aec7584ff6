//! Against a real OpenID provider: the npm package `oidc-provider`, started here
//! from `tests/oidc` (installed with `npm ci` by `scripts/test`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custody_cli::dev::GenOptions;

use crate::harness;

const AGENT_SECRET: &str = "agent-ci-secret-for-tests";

/// The provider process; killed on drop.
pub struct Oidc {
    child: Child,
    pub issuer: String,
}

impl Drop for Oidc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Oidc {
    pub async fn start() -> Oidc {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("oidc");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "oidc-provider is not installed: run `npm ci --prefix tests/oidc` (scripts/test does)"
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("node")
            .arg(dir.join("server.mjs"))
            .args(["--port", &port.to_string(), "--agent-secret", AGENT_SECRET])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start node (Node.js 20+ is required for the OIDC tests)");
        let o = Oidc {
            child,
            issuer: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = format!("{}/.well-known/openid-configuration", o.issuer);
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return o;
                }
            }
            assert!(Instant::now() < deadline, "oidc-provider did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client-credentials access token for the machine client `agent-ci`.
    pub async fn client_credentials(&self) -> String {
        self.client_credentials_for("agent-ci").await
    }

    /// A client-credentials access token for `client` (`agent-ci`, `ops-bot`).
    pub async fn client_credentials_for(&self, client: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(AGENT_SECRET))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "token request failed: {}",
            r.status()
        );
        let v: serde_json::Value = r.json().await.unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    /// Replaces the provider's signing key (the old one is dropped).
    pub async fn rotate(&self) -> String {
        let v: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/__test/rotate", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["kid"].as_str().unwrap().to_owned()
    }
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// Lets the coordinators refresh this issuer's JWKS every second.
fn fast_jwks_refresh(c: &harness::TestCluster, issuer: &str) {
    for n in c.nodes.values() {
        let text = std::fs::read_to_string(&n.config).unwrap();
        let mut t: toml::Table = toml::from_str(&text).unwrap();
        let issuers = t["auth"]["issuers"].as_array_mut().unwrap();
        for i in issuers.iter_mut() {
            let i = i.as_table_mut().unwrap();
            if i["issuer"].as_str() == Some(issuer) {
                i.insert("jwks_min_refresh_secs".into(), 1.into());
            }
        }
        std::fs::write(&n.config, toml::to_string(&t).unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_tokens_from_a_real_provider_are_accepted_and_key_rotation_is_picked_up() {
    let oidc = Oidc::start().await;
    let opts = GenOptions {
        issuer: Some((oidc.issuer.clone(), "urn:custody".into())),
        ..GenOptions::default()
    };
    let mut c = harness::cluster(opts);
    fast_jwks_refresh(&c, &oidc.issuer);
    c.start_all().unwrap();
    c.wait_for_leader(&[], Duration::from_secs(30))
        .await
        .unwrap();

    let token = oidc.client_credentials().await;
    let client = c
        .client_as(&[], Duration::from_secs(10), Some(token.clone()))
        .unwrap();
    let me = client.whoami().await.unwrap();
    assert_eq!(me.issuer, oidc.issuer);
    assert_eq!(me.subject, "agent-ci");
    assert_eq!(me.client_kind, "machine");
    // The second issuer's groups name it (the dev issuer is the first).
    assert_eq!(me.groups, vec![format!("{}#ai-agents", oidc.issuer)]);

    // A second issuer cannot mint admins: its `custody-admins` is its own.
    let ops = c
        .client_as(
            &[],
            Duration::from_secs(10),
            Some(oidc.client_credentials_for("ops-bot").await),
        )
        .unwrap();
    let who = ops.whoami().await.unwrap();
    assert_eq!(who.groups, vec![format!("{}#custody-admins", oidc.issuer)]);
    assert!(who.roles.is_empty(), "{:?}", who.roles);
    let e = ops.put("x", b"1".to_vec()).await.unwrap_err();
    assert!(e.to_string().contains("PermissionDenied"), "{e}");

    // `custody login --client-credentials` stores a 0600 token file that later
    // commands use.
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("custody").join("token.json");
    let cli = |args: &[&str]| {
        std::process::Command::new(&c.bins.custody)
            .args(args)
            .env_remove("CUSTODY_TOKEN")
            .env("CUSTODY_TOKEN_FILE", &token_file)
            .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
            .env("CUSTODY_CA", c.ca_path())
            .env("CUSTODY_CLIENT_SECRET", AGENT_SECRET)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "login",
        "--client-credentials",
        "--issuer",
        &oidc.issuer,
        "--client-id",
        "agent-ci",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = cli(&["whoami", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["subject"], "agent-ci");
    assert_eq!(me["client_kind"], "machine");
    let out = cli(&[
        "login",
        "--client-credentials",
        "--issuer",
        &oidc.issuer,
        "--client-id",
        "nobody",
    ]);
    assert!(!out.status.success(), "an unknown client logged in");
    assert!(String::from_utf8_lossy(&out.stderr).contains("token request failed"));
    assert!(cli(&["logout"]).status.success());
    assert!(!token_file.exists());

    // Rotate at the provider: new tokens carry a new kid, which the coordinators
    // fetch on first sight, without a restart.
    let old_kid = kid(&token);
    let new_kid = oidc.rotate().await;
    assert_ne!(old_kid, new_kid);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = oidc.client_credentials().await;
    assert_eq!(kid(&fresh), new_kid);
    for id in c.nodes.keys() {
        let me = c
            .client_as(&[*id], Duration::from_secs(10), Some(fresh.clone()))
            .unwrap()
            .whoami()
            .await
            .unwrap_or_else(|e| panic!("node {id} rejected the rotated key: {e}"));
        assert_eq!(me.subject, "agent-ci");
    }
    // The dropped key no longer verifies.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = client.whoami().await.unwrap_err().to_string();
    assert!(e.contains("unknown to the issuer"), "{e}");
}

/// The first `<form>` on a page: its action and its inputs' names and values.
fn first_form(page: &str) -> Option<(String, Vec<(String, String)>)> {
    let start = page.find("<form")?;
    let end = start + page[start..].find("</form>")?;
    let form = &page[start..end];
    let attr = |tag: &str, name: &str| -> Option<String> {
        let key = format!("{name}=\"");
        let i = tag.find(&key)? + key.len();
        let j = i + tag[i..].find('"')?;
        Some(tag[i..j].replace("&amp;", "&"))
    };
    let open_tag = &form[..form.find('>')?];
    let action = attr(open_tag, "action")?;
    let mut fields = Vec::new();
    let mut rest = form;
    while let Some(i) = rest.find("<input") {
        let tag_end = i + rest[i..].find('>')?;
        let tag = &rest[i..tag_end];
        if let Some(name) = attr(tag, "name") {
            fields.push((name, attr(tag, "value").unwrap_or_default()));
        }
        rest = &rest[tag_end..];
    }
    Some((action, fields))
}

/// Plays the person in a browser: opens the verification URI, confirms the
/// code, signs in as `login` and consents, following the provider's forms.
async fn approve_device_login(issuer: &str, verification_uri_complete: &str, login: &str) {
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let mut page = browser
        .get(verification_uri_complete)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for _ in 0..8 {
        if page.contains("Sign-in Success") {
            return;
        }
        let (action, mut fields) =
            first_form(&page).unwrap_or_else(|| panic!("no form on the provider's page: {page}"));
        for (name, value) in fields.iter_mut() {
            match name.as_str() {
                "login" => *value = login.to_owned(),
                "password" => *value = "any password".to_owned(),
                _ => {}
            }
        }
        let url = if action.starts_with('/') {
            format!("{issuer}{action}")
        } else {
            action
        };
        page = browser
            .post(url)
            .form(&fields)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    }
    panic!("the device login did not finish: {page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flow_login_completes_and_refreshes_its_token() {
    use std::io::BufRead as _;
    let oidc = Oidc::start().await;
    let opts = GenOptions {
        issuer: Some((oidc.issuer.clone(), "urn:custody".into())),
        ..GenOptions::default()
    };
    let (c, _) = harness::started(opts).await;
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token.json");
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(&c.bins.custody);
        cmd.args(args)
            .env_remove("CUSTODY_TOKEN")
            .env("CUSTODY_TOKEN_FILE", &token_file)
            .env("CUSTODY_COORDINATOR", c.api_urls(&[]))
            .env("CUSTODY_CA", c.ca_path());
        cmd
    };
    let mut login = cli(&[
        "login",
        "--issuer",
        &oidc.issuer,
        "--client-id",
        "custody-cli",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The CLI prints where to go; read it like a person would.
    let stderr = login.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut shown = String::new();
    let uri = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no verification URI printed: {shown}"));
        shown.push_str(&line);
        shown.push('\n');
        if let Some(rest) = line.strip_prefix("To log in, open ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    assert!(uri.contains("user_code="), "{uri}");
    approve_device_login(&oidc.issuer, &uri, "alice").await;
    let status = tokio::task::spawn_blocking(move || login.wait().unwrap())
        .await
        .unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "login failed: {shown}{}", rest.join("\n"));

    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&token_file).unwrap()).unwrap();
    assert!(
        stored["refresh_token"].is_string(),
        "a refresh token is kept"
    );
    let whoami = |cli: &dyn Fn(&[&str]) -> Command| {
        let out = cli(&["whoami", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let me = whoami(&cli);
    assert_eq!(me["subject"], "alice");
    assert_eq!(me["client_kind"], "human");
    assert_eq!(
        me["groups"],
        serde_json::json!([format!("{}#engineers", oidc.issuer)])
    );

    // Expire the stored access token: the next command refreshes it and
    // rewrites the file.
    let mut expired = stored.clone();
    expired["expires_at"] = serde_json::json!(1);
    expired["access_token"] = serde_json::json!("expired-token");
    std::fs::write(&token_file, serde_json::to_vec(&expired).unwrap()).unwrap();
    let me = whoami(&cli);
    assert_eq!(me["subject"], "alice");
    let fresh: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&token_file).unwrap()).unwrap();
    assert_ne!(fresh["access_token"], "expired-token");
    assert!(fresh["expires_at"].as_u64().unwrap() > 1);

    // Without a refresh token an expired login says so.
    let mut dead = fresh.clone();
    dead["expires_at"] = serde_json::json!(1);
    dead.as_object_mut().unwrap().remove("refresh_token");
    std::fs::write(&token_file, serde_json::to_vec(&dead).unwrap()).unwrap();
    let out = cli(&["whoami"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has expired: run `custody login` again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
