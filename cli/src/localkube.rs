//! The tests' Kubernetes API server (`custody-kube-test-server`, built
//! beside the custody binary; not a real cluster) as a child process, for
//! `custody dev up` (`local-kube`) and `custody-chaos bench kube`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub struct LocalKube {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Its certificate (the CA to trust) and the bearer token it accepts.
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    /// Left running when this is dropped (`dev down` stops it by pid).
    pub child: std::process::Child,
}

impl LocalKube {
    /// The server binary next to `custody`, if built.
    pub fn binary(custody: &Path) -> Option<PathBuf> {
        Some(custody.with_file_name("custody-kube-test-server")).filter(|b| b.exists())
    }

    /// Starts `bin` serving from `dir`, logging to `log`; waits until it
    /// is up.
    pub fn start(bin: &Path, dir: &Path, log: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(dir.join("kube.json"));
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut child = std::process::Command::new(bin)
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let info: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(dir.join("kube.json")) {
                if let Ok(v) = serde_json::from_str(&text) {
                    break v;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the test API server did not start (see {})", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Self {
            url: info["url"].as_str().unwrap_or_default().to_owned(),
            ca_file: dir.join("kube-ca.pem"),
            token_file: dir.join("kube-token"),
            child,
        })
    }

    /// An edge's `[[resources]]` entry for it.
    pub fn resource_toml(&self, name: &str, labels: &str) -> String {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"kubernetes\"\nlabels = {{ {labels} }}\n[resources.kubernetes]\nserver = \"{}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n",
            self.url,
            self.ca_file.display(),
            self.token_file.display(),
        )
    }
}
