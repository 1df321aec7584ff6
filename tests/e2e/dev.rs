//! `custody dev up --detach` / `custody dev down`, as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use custody_cli::dev::Binaries;

fn custody(bins: &Binaries, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(&bins.custody);
    c.args(args)
        .env_remove("CUSTODY_COORDINATOR")
        .env_remove("CUSTODY_CA");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run custody")
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Runs `custody dev down` when dropped, so a failing assertion does not
/// leave a detached dev system running.
struct DownOnDrop<'a> {
    bins: &'a Binaries,
    dir: String,
}

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        let _ = custody(self.bins, &["dev", "down", "--dir", &self.dir], &[]);
        // A cluster placed where the postgres user can reach it is not
        // under the test's directory: remove it too.
        if let Ok(home) = std::fs::read_link(Path::new(&self.dir).join("postgres")) {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

#[test]
fn dev_up_detach_writes_dev_json_and_dev_down_stops_everything() {
    crate::harness::init();
    let bins = Binaries::locate().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Under a directory only its owner may enter (a checkout under /root,
    // `mktemp -d`): as root, the private PostgreSQL (run as `postgres`)
    // must still start.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let dir = tmp.path().join("dev");
    let d = dir.to_str().unwrap();
    let _down = DownOnDrop {
        bins: &bins,
        dir: d.to_owned(),
    };
    let out = custody(&bins, &["dev", "up", "--dir", d, "--detach"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("custody cluster status"));

    let dev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let coords = dev["coordinators"].as_array().unwrap();
    assert_eq!(coords.len(), 3);
    let mut pids = Vec::new();
    for c in coords {
        let pid = c["pid"].as_u64().unwrap();
        assert!(alive(pid), "coordinator {c} not running");
        assert!(c["api"].as_str().unwrap().starts_with("https://"));
        assert!(c["id"].as_u64().is_some() && c["region"].as_str().is_some());
        pids.push(pid);
    }
    let edges = dev["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "{dev}");
    assert_eq!(edges[0]["name"], "dev-edge");
    let edge_pid = edges[0]["pid"].as_u64().unwrap();
    assert!(alive(edge_pid), "edge not running");
    pids.push(edge_pid);
    let coord = dev["env"]["CUSTODY_COORDINATOR"]
        .as_str()
        .unwrap()
        .to_owned();
    let ca = dev["env"]["CUSTODY_CA"].as_str().unwrap().to_owned();
    assert!(Path::new(&ca).is_file());
    assert_eq!(
        dev["env"]["CUSTODY_TOKEN"],
        dev["identities"]["alice"]["token"]
    );
    for who in ["admin", "alice", "bob", "agent"] {
        assert!(
            dev["identities"][who]["token"]
                .as_str()
                .is_some_and(|t| t.len() > 20),
            "{who}"
        );
        assert!(dev["identities"][who]["groups"].is_array(), "{who}");
    }
    let mode = std::fs::metadata(dir.join("dev.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "dev.json holds tokens and must be private");
    let alice_token = dev["env"]["CUSTODY_TOKEN"].as_str().unwrap().to_owned();
    let admin_token = dev["identities"]["admin"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let alice = [
        ("CUSTODY_COORDINATOR", coord.as_str()),
        ("CUSTODY_CA", ca.as_str()),
        ("CUSTODY_TOKEN", alice_token.as_str()),
    ];
    let env = [
        ("CUSTODY_COORDINATOR", coord.as_str()),
        ("CUSTODY_CA", ca.as_str()),
        ("CUSTODY_TOKEN", admin_token.as_str()),
    ];
    let out = custody(&bins, &["whoami", "--json"], &alice);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["subject"], "alice");
    assert_eq!(me["groups"], serde_json::json!(["engineers"]));
    // Alice is no admin: the KV namespace is closed to her.
    let out = custody(&bins, &["kv", "put", "greeting", "hello"], &alice);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires role admin"));

    // The dev edge serves local-shell, and alice may use it.
    let out = custody(
        &bins,
        &["exec", "local-shell", "--", "sh", "-c", "echo hi; exit 3"],
        &alice,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = custody(&bins, &["resources"], &alice);
    assert!(String::from_utf8_lossy(&out.stdout).contains("local-shell"));

    // The demo database: PII masked for alice through the gateway.
    let pg = &dev["postgres"];
    assert_eq!(pg["resource"], "local-postgres", "{dev}");
    let out = custody(
        &bins,
        &[
            "exec",
            "local-postgres",
            "--sql",
            "select name, email, card_number, customer_ssn, note as remark from customers where id = 1",
            "--json",
        ],
        &alice,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        rows["rows"][0],
        serde_json::json!({"name": "Ada Lovelace", "email": "[email]", "card_number": "[credit_card]", "customer_ssn": "****", "remark": "****"})
    );
    // Schema changes wait for an approver (a client that does not wait is
    // told the request id).
    let out = custody(
        &bins,
        &[
            "exec",
            "local-postgres",
            "--sql",
            "create table scratch (a int)",
            "--no-wait",
        ],
        &alice,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(254), "{err}");
    assert!(err.contains("approval required"), "{err}");
    let pg_data = std::path::PathBuf::from(pg["data_dir"].as_str().unwrap());
    assert!(pg_data.join("postmaster.pid").exists());

    // The demo Kubernetes API (the tests' server): kubectl through the
    // gateway with the context `custody kube login` writes.
    let kube = &dev["kube"];
    assert_eq!(kube["resource"], "local-kube", "{dev}");
    let kube_pid = kube["pid"].as_u64().unwrap();
    assert!(alive(kube_pid));
    pids.push(kube_pid);
    let kubeconfig = tmp.path().join("kubeconfig");
    let kc = kubeconfig.display().to_string();
    let out = custody(
        &bins,
        &["kube", "login", "local-kube", "--kubeconfig", &kc],
        &alice,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("kubectl")
        .args([
            "--kubeconfig",
            &kc,
            "--context",
            "local-kube",
            "get",
            "pods",
        ])
        .envs(alice.iter().copied())
        .env_remove("CUSTODY_TOKEN_FILE")
        .output()
        .expect("run kubectl");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("web-1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = custody(&bins, &["kv", "put", "greeting", "hello"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = custody(&bins, &["kv", "get", "greeting"], &env);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    let out = custody(&bins, &["kv", "get", "missing"], &env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let out = custody(&bins, &["cluster", "status"], &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("leader: node"));

    let out = custody(&bins, &["dev", "down", "--dir", d], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in pids {
        assert!(!alive(p), "pid {p} survived dev down");
    }
    assert!(
        !pg_data.join("postmaster.pid").exists(),
        "dev down stops the demo database"
    );
    // Without the env, the CLI says what is missing.
    let out = custody(&bins, &["cluster", "status"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CUSTODY_COORDINATOR"));
}
