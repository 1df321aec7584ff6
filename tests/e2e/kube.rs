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

    // From a manifest (JSON on the wire; `kubectl create configmap` sends
    // protobuf, which this server does not read yet).
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

    // What kubectl sent is logged, with kubectl's own headers.
    let seen = api.seen();
    assert!(seen.iter().any(|s| s.method == "DELETE"
        && s.path.contains("/configmaps/settings")
        && s.headers.iter().any(|(k, _)| k == "kubectl-command")));
}
