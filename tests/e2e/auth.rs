//! Identity and policy against real processes, with tokens from the built-in
//! dev issuer (the same verifier path as with a real provider).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use custody_cli::dev::GenOptions;
use custody_proto::v1 as api;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::harness::{self, TestCluster};

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs claims with the cluster's dev-issuer key (as the provider would).
pub(crate) fn sign(c: &TestCluster, claims: &serde_json::Value, kid: Option<&str>) -> String {
    let pem = std::fs::read(c.dir.join("dev-issuer-key.pem")).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.typ = Some("at+jwt".into());
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_pem(&pem).unwrap()).unwrap()
}

pub(crate) fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn good_claims() -> serde_json::Value {
    json!({"iss": "https://dev-issuer.custody.local", "aud": "urn:custody", "sub": "mallory",
           "exp": now() + 600, "iat": now(), "groups": ["custody-admins"]})
}

async fn whoami_with(c: &TestCluster, token: &str) -> Result<api::WhoAmIResponse, String> {
    c.client_as(&[], Duration::from_secs(5), Some(token.to_owned()))
        .unwrap()
        .whoami()
        .await
        .map_err(|e| e.to_string())
}

fn logs(c: &TestCluster) -> String {
    c.nodes
        .keys()
        .map(|id| std::fs::read_to_string(c.log_path(*id)).unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_verified_and_bad_ones_refused_with_audit_events() {
    let (c, _) = harness::started(GenOptions::default()).await;
    let admin = c.mint_token("admin").await.unwrap().token;
    let alice = c.mint_token("alice").await.unwrap().token;
    let agent = c.mint_token("agent").await.unwrap().token;

    let me = whoami_with(&c, &alice).await.unwrap();
    assert_eq!(
        (me.subject.as_str(), me.client_kind.as_str()),
        ("alice", "human")
    );
    assert_eq!(me.groups, vec!["engineers"]);
    assert!(me.roles.is_empty());
    let me = whoami_with(&c, &agent).await.unwrap();
    assert_eq!(
        (me.subject.as_str(), me.client_kind.as_str()),
        ("agent", "machine")
    );
    assert_eq!(me.groups, vec!["ai-agents"]);
    let me = whoami_with(&c, &admin).await.unwrap();
    assert_eq!(me.roles, vec!["admin"]);

    let kid = kid_of(&admin);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good_claims();
        f(&mut v);
        sign(&c, &v, Some(&kid))
    };
    // Sanity: a correctly signed token with good claims passes.
    assert_eq!(
        whoami_with(&c, &with(&|_| {})).await.unwrap().subject,
        "mallory"
    );

    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let none_token = format!(
        "{}.{}.",
        enc(br#"{"alg":"none","typ":"at+jwt"}"#),
        enc(good_claims().to_string().as_bytes())
    );
    let jwks: serde_json::Value = reqwest_get_jwks(&c).await;
    let hs = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.clone());
        h.typ = Some("at+jwt".into());
        let secret = serde_json::to_vec(&jwks["keys"][0]).unwrap();
        jsonwebtoken::encode(&h, &good_claims(), &EncodingKey::from_secret(&secret)).unwrap()
    };
    let foreign = {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("not-a-known-key".into());
        h.typ = Some("at+jwt".into());
        jsonwebtoken::encode(
            &h,
            &good_claims(),
            &EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let tampered = {
        let parts: Vec<&str> = alice.split('.').collect();
        let payload: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        let mut p = payload.clone();
        p["groups"] = json!(["custody-admins"]);
        format!(
            "{}.{}.{}",
            parts[0],
            enc(p.to_string().as_bytes()),
            parts[2]
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            with(&|v| v["aud"] = json!("urn:other")),
            "audience",
        ),
        (
            "no audience",
            with(&|v| {
                v.as_object_mut().unwrap().remove("aud");
            }),
            "audience",
        ),
        (
            "unconfigured issuer",
            with(&|v| v["iss"] = json!("https://evil.example")),
            "not configured",
        ),
        (
            "expired",
            with(&|v| v["exp"] = json!(now() - 3600)),
            "expired",
        ),
        (
            "not yet valid",
            with(&|v| v["nbf"] = json!(now() + 3600)),
            "not valid yet",
        ),
        ("alg none", none_token, "algorithm refused"),
        ("HS256 with the public key", hs, "algorithm refused"),
        ("unknown kid", foreign, "unknown to the issuer"),
        ("tampered payload", tampered, "signature is invalid"),
        ("garbage", "not.a.token".into(), "malformed"),
    ];
    for (what, token, expect) in &cases {
        let e = whoami_with(&c, token).await.unwrap_err();
        assert!(e.contains("Unauthenticated"), "{what}: {e}");
        assert!(e.contains(expect), "{what}: {e}");
    }
    let no_token = c
        .client_as(&[], Duration::from_secs(5), None)
        .unwrap()
        .whoami()
        .await
        .unwrap_err();
    assert!(
        no_token.to_string().contains("no bearer token"),
        "{no_token}"
    );

    // Every rejection is an audit event; no token appears in any log.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = logs(&c);
    let audits = text.matches("auth_rejected").count();
    assert!(audits > cases.len(), "only {audits} audit events");
    for code in [
        "wrong_audience",
        "unknown_issuer",
        "expired",
        "not_yet_valid",
        "algorithm",
        "unknown_key",
        "bad_signature",
        "malformed",
        "missing",
    ] {
        assert!(text.contains(code), "no audit event with reason {code}");
    }
    for (what, token, _) in &cases {
        let sig = token.rsplit('.').next().unwrap_or_default();
        if sig.len() > 10 {
            assert!(!text.contains(sig), "{what}: token signature found in logs");
        }
    }
    for t in [&admin, &alice, &agent] {
        assert!(!text.contains(t.as_str()), "a valid token was logged");
        assert!(
            !text.contains(t.rsplit('.').next().unwrap()),
            "a token signature was logged"
        );
    }
    // Nor in the stored data (write-ahead logs and manifests are uncompressed).
    for n in c.nodes.values() {
        for entry in walk(&n.data_dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            let hay = String::from_utf8_lossy(&bytes);
            for t in [&admin, &alice, &agent] {
                assert!(
                    !hay.contains(t.rsplit('.').next().unwrap()),
                    "token stored in {}",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn reqwest_get_jwks(c: &TestCluster) -> serde_json::Value {
    let issuer = c.nodes.values().find_map(|n| n.dev_issuer.clone()).unwrap();
    let body = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-sf", &format!("http://{issuer}/jwks")])
            .output()
            .unwrap();
        out.stdout
    })
    .await
    .unwrap();
    serde_json::from_slice(&body).unwrap()
}

const POLICY: &str = r#"
roles:
  admin: { groups: [custody-admins] }
  auditor: { groups: [auditors] }
  approver: { groups: [approvers] }
guardrails:
  - name: destructive
    pattern: 'rm\s+-rf'
    decision: deny
rules:
  - name: engineers-dev
    identity: { groups: [engineers] }
    resource: { labels: { env: dev } }
    actions: [connect, exec]
    decision: allow
    guardrails: [destructive]
  - name: engineers-prod
    identity: { groups: [engineers] }
    resource: { labels: { env: prod } }
    actions: [exec]
    decision: require_approval
    approval: { groups: [approvers], count: 1, webhook: 'http://127.0.0.1:9/hooks/T0/sekret' }
"#;

fn test_req(who: &str, resource: &str, env: &str, command: &str) -> api::TestPolicyRequest {
    api::TestPolicyRequest {
        r#as: who.into(),
        resource: resource.into(),
        resource_kind: "shell".into(),
        labels: [("env".to_string(), env.to_string())].into(),
        action: "exec".into(),
        command: command.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_is_replicated_enforced_everywhere_and_explained() {
    let (c, leader) = harness::started(GenOptions::default()).await;
    let follower = c.nodes.keys().copied().find(|i| *i != leader).unwrap();
    let tok = |who: &str| {
        let c = &c;
        let who = who.to_owned();
        async move { c.mint_token(&who).await.unwrap().token }
    };
    let (admin, alice, audrey) = (tok("admin").await, tok("alice").await, tok("audrey").await);
    let as_user = |t: &str, ids: &[u64]| {
        c.client_as(ids, Duration::from_secs(10), Some(t.to_owned()))
            .unwrap()
    };

    // Alice has signed in (so `--as alice` resolves) but may not change policy.
    as_user(&alice, &[]).whoami().await.unwrap();
    let e = as_user(&alice, &[])
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("PermissionDenied") && e.to_string().contains("requires role admin"),
        "{e}"
    );
    // Nor may an auditor, before or after the policy names auditors.
    assert!(as_user(&audrey, &[])
        .policy_apply(POLICY, "yaml")
        .await
        .is_err());

    // Without a policy, everything is denied by default.
    let d = as_user(&admin, &[])
        .policy_test(test_req("alice", "shell-1", "dev", "ls"))
        .await
        .unwrap();
    assert_eq!(d.effect, "deny");
    assert!(d.reason.contains("denied by default"), "{}", d.reason);

    // A bad document gets a clear error and changes nothing.
    let e = as_user(&admin, &[])
        .policy_apply("rules: [{name: x, actions: [], decision: allow}]", "yaml")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("actions must not be empty"), "{e}");
    assert_eq!(as_user(&admin, &[]).policy_show().await.unwrap().version, 0);

    // Applied through the leader, enforced at once through a follower.
    let r = as_user(&admin, &[leader])
        .policy_apply(POLICY, "yaml")
        .await
        .unwrap();
    assert_eq!(r.version, 1);
    let via_follower = as_user(&admin, &[follower]);
    let d = via_follower
        .policy_test(test_req("alice", "shell-1", "dev", "ls -l"))
        .await
        .unwrap();
    assert_eq!(
        (d.effect.as_str(), d.rule.as_str()),
        ("allow", "engineers-dev")
    );
    let d = via_follower
        .policy_test(test_req("alice", "shell-1", "dev", "rm -rf /tmp/x"))
        .await
        .unwrap();
    assert_eq!(
        (d.effect.as_str(), d.rule.as_str()),
        ("deny", "guardrail:destructive")
    );
    let d = via_follower
        .policy_test(test_req("alice", "shell-1", "prod", "ls"))
        .await
        .unwrap();
    assert_eq!(d.effect, "require_approval");
    assert_eq!(
        (d.approvals_required, d.approver_groups.clone()),
        (1, vec!["approvers".to_string()])
    );
    let d = via_follower
        .policy_test(test_req("bob", "shell-1", "dev", "ls"))
        .await;
    assert!(d.is_err(), "bob never signed in; --as must not invent him");
    let mut hypothetical = test_req("", "shell-1", "dev", "ls");
    hypothetical.groups = vec!["approvers".into()];
    let d = via_follower.policy_test(hypothetical).await.unwrap();
    assert_eq!(d.effect, "deny");
    assert!(
        d.trace.iter().any(|t| t.contains("none of the groups")),
        "{:?}",
        d.trace
    );

    // Auditors can read and test policy now; show names the author.
    let shown = as_user(&audrey, &[follower]).policy_show().await.unwrap();
    assert_eq!(shown.version, 1);
    assert!(shown.author.ends_with(" admin"), "{}", shown.author);
    assert!(shown.yaml.contains("engineers-dev"));
    // Webhook URLs (which carry the receiver's secret) are for admins only.
    assert!(!shown.yaml.contains("sekret"), "{}", shown.yaml);
    assert!(shown.yaml.contains("redacted"), "{}", shown.yaml);
    let full = as_user(&admin, &[follower]).policy_show().await.unwrap();
    assert!(full.yaml.contains("hooks/T0/sekret"), "{}", full.yaml);
    // Someone with no API role cannot read the policy at all.
    let e = as_user(&alice, &[]).policy_show().await.unwrap_err();
    assert!(e.to_string().contains("PermissionDenied"), "{e}");
    as_user(&audrey, &[])
        .policy_test(test_req("alice", "s", "dev", ""))
        .await
        .unwrap();
    // But alice cannot test policy.
    assert!(as_user(&alice, &[])
        .policy_test(test_req("alice", "s", "dev", ""))
        .await
        .is_err());

    // The CLI explains a decision.
    let out = std::process::Command::new(&c.bins.custody)
        .args([
            "policy",
            "test",
            "--as",
            "alice",
            "--resource",
            "shell-1",
            "--kind",
            "shell",
            "--label",
            "env=dev",
            "--action",
            "exec",
            "--command",
            "rm -rf /",
        ])
        .env("CUSTODY_COORDINATOR", c.api_urls(&[follower]))
        .env("CUSTODY_CA", c.ca_path())
        .env("CUSTODY_TOKEN", &admin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("deny: denied by guardrail \"destructive\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("rule \"engineers-prod\": skipped"),
        "{stdout}"
    );

    // A second version replaces the first everywhere.
    assert!(POLICY.contains("webhook: 'http://127.0.0.1:9/hooks/T0/sekret' }"));
    let v2 = POLICY.replace(
        "decision: require_approval\n    approval: { groups: [approvers], count: 1, webhook: 'http://127.0.0.1:9/hooks/T0/sekret' }",
        "decision: deny",
    );
    assert_eq!(
        as_user(&admin, &[follower])
            .policy_apply(&v2, "yaml")
            .await
            .unwrap()
            .version,
        2
    );
    for id in c.nodes.keys() {
        let d = as_user(&admin, &[*id])
            .policy_test(test_req("alice", "s", "prod", "ls"))
            .await
            .unwrap();
        assert_eq!(d.effect, "deny", "node {id}");
    }
}
