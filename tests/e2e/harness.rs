//! Shared helpers: temporary clusters that print their logs when a test fails.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use custody_cli::dev::{Binaries, GenOptions, LocalCluster};

/// A cluster in a temporary directory. On panic, prints the tail of each log.
pub struct TestCluster {
    // Field order matters: the cluster (processes) drops before the directory.
    pub cluster: LocalCluster,
    pub _tmp: tempfile::TempDir,
}

impl Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.cluster
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for id in self.cluster.nodes.keys() {
            let log = std::fs::read_to_string(self.cluster.log_path(*id)).unwrap_or_default();
            // A node that exited with an error says why first; backtraces follow.
            for l in error_chain(&log) {
                eprintln!("node {id}: {l}");
            }
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- node {id} log (last {} lines) -----", tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        for e in self.cluster.edges.values() {
            let log = std::fs::read_to_string(&e.log).unwrap_or_default();
            for l in error_chain(&log) {
                eprintln!("edge {}: {l}", e.name);
            }
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "----- edge {} log (last {} lines) -----",
                e.name,
                tail.len()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The lines of each `Error:` report in a process log with their causes,
/// without the backtrace that follows.
fn error_chain(log: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in log.lines() {
        if l.starts_with("Error:") {
            inside = true;
        } else if inside && (l.starts_with("Stack backtrace:") || l.trim().starts_with("0:")) {
            inside = false;
        }
        if inside {
            out.push(l);
        }
    }
    out
}

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Generates a cluster (not started).
pub fn cluster(opts: GenOptions) -> TestCluster {
    init();
    let dir = tempfile::tempdir().expect("tempdir");
    let bins = Binaries::locate().expect("locate binaries");
    let cluster = LocalCluster::generate(bins, dir.path(), &opts).expect("generate cluster");
    TestCluster { cluster, _tmp: dir }
}

/// Generates and starts a 3-node cluster, and waits for a leader.
pub async fn started(opts: GenOptions) -> (TestCluster, u64) {
    let mut c = cluster(opts);
    c.start_all().expect("start nodes");
    let leader = c
        .wait_for_leader(&[], Duration::from_secs(30))
        .await
        .expect("leader elected");
    (c, leader)
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// A tmux server on its own socket, for driving a real terminal; killed on
/// drop.
pub struct Tmux {
    sock: std::path::PathBuf,
}

impl Tmux {
    pub fn new(dir: &std::path::Path) -> Self {
        Self {
            sock: dir.join("tmux.sock"),
        }
    }

    /// Runs a tmux command; its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .args(args)
            .output()
            .expect("run tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A detached session `name`, `cols`×`rows`, running `command`.
    pub fn start(&self, name: &str, cols: u16, rows: u16, command: &str) {
        let (cols, rows) = (cols.to_string(), rows.to_string());
        self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            &cols,
            "-y",
            &rows,
            command,
        ]);
    }

    /// What the session's pane shows.
    pub fn pane(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// A session as the asciicast lines `custody sessions replay --asciicast`
/// writes (into `path`), read by `token`.
pub fn asciicast(
    c: &TestCluster,
    token: &str,
    session_id: &str,
    path: &std::path::Path,
) -> Vec<serde_json::Value> {
    let out = crate::edge::custody(
        c,
        &[],
        token,
        &[
            "sessions",
            "replay",
            session_id,
            "--asciicast",
            &path.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The text an asciicast shows as output.
pub fn cast_output(lines: &[serde_json::Value]) -> String {
    lines[1..]
        .iter()
        .filter(|l| l[1] == "o")
        .map(|l| l[2].as_str().unwrap_or_default())
        .collect()
}
