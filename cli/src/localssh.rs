//! A private OpenSSH server on a loopback port, for `custody dev up` and the
//! tests: its own host key, a key only the edge holds, public-key login as
//! the user running it (root logs in as root, by key only), the internal
//! SFTP server, and nothing read from `/etc/ssh`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A running sshd; killed on drop.
#[derive(Debug)]
pub struct LocalSshd {
    pub dir: PathBuf,
    pub port: u16,
    /// The login the edge uses.
    pub user: String,
    /// The edge's private key (OpenSSH format).
    pub key_file: PathBuf,
    /// The server's public host key line.
    pub host_key: String,
    /// The public key line of the authority that signed the server's host
    /// certificate (it presents one to clients that ask).
    pub host_ca: String,
    child: Option<Child>,
}

fn sshd_bin() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "custody-dev", "-f"])
        .arg(path)
        .output()
        .context("run ssh-keygen (the OpenSSH client; scripts/setup installs it)")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The user this process runs as.
pub fn current_user() -> anyhow::Result<String> {
    let out = Command::new("id").arg("-un").output().context("run id")?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if name.is_empty() {
        bail!("cannot tell which user this is");
    }
    Ok(name)
}

impl LocalSshd {
    /// Creates keys and a configuration in `dir`, then starts sshd.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let sshd = sshd_bin().context(
            "the OpenSSH server is not installed (scripts/setup installs openssh-server)",
        )?;
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let host_key = dir.join("ssh_host_ed25519_key");
        let key_file = dir.join("edge_key");
        if !host_key.exists() {
            keygen(&host_key)?;
        }
        if !key_file.exists() {
            keygen(&key_file)?;
        }
        // A host certificate, for edges that pin an authority instead of
        // the key.
        let ca = dir.join("host_ca");
        if !ca.exists() {
            keygen(&ca)?;
        }
        let cert = dir.join("ssh_host_ed25519_key-cert.pub");
        if !cert.exists() {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-s"])
                .arg(&ca)
                .args(["-I", "custody-local-ssh", "-h", "-n", "127.0.0.1,localhost"])
                .args(["-V", "-5m:+3650d"])
                .arg(host_key.with_extension("pub"))
                .output()
                .context("run ssh-keygen to sign the host certificate")?;
            if !out.status.success() {
                bail!(
                    "ssh-keygen -s failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let authorized = dir.join("authorized_keys");
        std::fs::copy(key_file.with_extension("pub"), &authorized)?;
        std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600))?;
        if crate::localpg::is_root() {
            // Privilege separation needs its directory when run as root.
            std::fs::create_dir_all("/run/sshd")?;
            std::fs::set_permissions("/run/sshd", std::fs::Permissions::from_mode(0o755))?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nHostCertificate {}\nPidFile {}\n\
                 AuthorizedKeysFile {}\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\nAllowTcpForwarding yes\n\
                 X11Forwarding no\nPrintMotd no\nPrintLastLog no\nAcceptEnv LANG LC_* CUSTODY_*\n\
                 LogLevel VERBOSE\n",
                host_key.display(),
                cert.display(),
                dir.join("sshd.pid").display(),
                authorized.display(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("sshd.log"))?;
        let child = Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", sshd.display()))?;
        let host_line = std::fs::read_to_string(host_key.with_extension("pub"))?
            .trim()
            .to_owned();
        let host_ca = std::fs::read_to_string(ca.with_extension("pub"))?
            .trim()
            .to_owned();
        let mut s = LocalSshd {
            dir: dir.to_owned(),
            port,
            user: current_user()?,
            key_file,
            host_key: host_line,
            host_ca,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
                    bail!("sshd exited ({status}): {log}");
                }
            }
            if Instant::now() > deadline {
                bail!("sshd did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    /// `[[resources]]` TOML for an edge serving this server as `name`.
    pub fn resource_toml(&self, name: &str, labels: &str) -> String {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"ssh\"\nlabels = {{ {labels} }}\n[resources.ssh]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nkey_file = \"{}\"\nhost_keys = [\"{}\"]\n",
            self.port,
            self.user,
            self.key_file.display(),
            self.host_key,
        )
    }

    /// Like [`LocalSshd::resource_toml`], but the target is pinned by the
    /// authority of its host certificate, not by its key.
    pub fn resource_toml_ca(&self, name: &str, labels: &str) -> String {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"ssh\"\nlabels = {{ {labels} }}\n[resources.ssh]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nkey_file = \"{}\"\nhost_cas = [\"{}\"]\n",
            self.port,
            self.user,
            self.key_file.display(),
            self.host_ca,
        )
    }

    /// ssh arguments for a direct connection (the baseline).
    pub fn direct_args(&self) -> Vec<String> {
        let known = self.dir.join("known_hosts");
        let _ = std::fs::write(
            &known,
            format!("[127.0.0.1]:{} {}\n", self.port, self.host_key),
        );
        vec![
            "-p".into(),
            self.port.to_string(),
            "-i".into(),
            self.key_file.display().to_string(),
            "-o".into(),
            format!("UserKnownHostsFile={}", known.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-l".into(),
            self.user.clone(),
        ]
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Leaves the server running after this value is dropped.
    pub fn detach(&mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalSshd {
    fn drop(&mut self) {
        self.stop();
    }
}
