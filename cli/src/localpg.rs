//! A private PostgreSQL cluster on a loopback port, for `custody dev up`, the
//! tests and the gateway benchmark: initdb with SCRAM-SHA-256, pg_ctl, run as
//! the `postgres` user when we are root (the server refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// The superuser password of every local cluster (loopback only).
pub const PASSWORD: &str = "s3cret-pg-password";

/// A running cluster; stopped on drop.
#[derive(Debug)]
pub struct LocalPostgres {
    pub dir: PathBuf,
    pub port: u16,
    pub password_file: PathBuf,
    /// Stop the server on drop.
    pub stop_on_drop: bool,
}

/// The server binary `name` of the newest installed major version.
pub fn pg_bin(name: &str) -> Option<PathBuf> {
    ["18", "17", "16", "15", "14"]
        .iter()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}")))
        .find(|p| p.exists())
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A command that runs as the `postgres` user when we are root.
pub fn as_pg_user(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Whether the `postgres` user can reach `dir` (every directory above it
/// must let it pass; a checkout under `/root` or a `mktemp -d` does not).
fn reachable_by_pg_user(dir: &Path) -> bool {
    !is_root()
        || Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
}

/// Where a cluster asked for in `dir` really lives: `dir` itself, or, when
/// the `postgres` user cannot reach it, a directory of its own under
/// `/var/tmp` that `dir` links to (so `dir` still shows where it is).
fn home_for(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash as _, Hasher as _};
    if let Ok(target) = std::fs::read_link(dir) {
        return Ok(target);
    }
    std::fs::create_dir_all(dir)?;
    if reachable_by_pg_user(dir) {
        return Ok(dir.to_owned());
    }
    let canonical = std::fs::canonicalize(dir)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    canonical.hash(&mut h);
    let home = PathBuf::from(format!("/var/tmp/custody-pg-{:016x}", h.finish()));
    if home.exists() {
        std::fs::remove_dir_all(&home)?;
    }
    std::fs::create_dir_all(&home)?;
    std::fs::remove_dir(dir)
        .with_context(|| format!("{} must be empty to hold a new cluster", dir.display()))?;
    std::os::unix::fs::symlink(&home, dir)
        .with_context(|| format!("link {} to {}", dir.display(), home.display()))?;
    if !reachable_by_pg_user(&home) {
        bail!(
            "the postgres user cannot reach {} or {}: make one of them reachable (chmod o+x on each directory above it)",
            dir.display(),
            home.display()
        );
    }
    Ok(home)
}

fn run(mut c: Command, what: &str) -> anyhow::Result<()> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl LocalPostgres {
    /// initdb + start in `dir` (created; must not hold a cluster yet). As
    /// root, when the `postgres` user cannot reach `dir`, the cluster lives
    /// in a directory of its own that `dir` links to.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let initdb = pg_bin("initdb").context(
            "PostgreSQL server binaries are not installed (scripts/setup installs them)",
        )?;
        let dir = &home_for(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let password_file = dir.join("pw");
        std::fs::write(&password_file, format!("{PASSWORD}\n"))?;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644))?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        if is_root() {
            let mut c = Command::new("chown");
            c.arg("postgres:postgres").arg(&data).arg(dir);
            run(c, "chown")?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut c = as_pg_user(&initdb);
        c.arg("-D")
            .arg(&data)
            .args(["-A", "scram-sha-256", "-U", "postgres", "--no-sync"])
            .arg(format!("--pwfile={}", password_file.display()));
        run(c, "initdb")?;
        let pg = LocalPostgres {
            dir: dir.to_owned(),
            port,
            password_file,
            stop_on_drop: true,
        };
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    /// Starts an existing cluster in `dir` again (on a fresh port).
    pub fn restart(dir: &Path) -> anyhow::Result<Self> {
        let dir = &std::fs::read_link(dir).unwrap_or_else(|_| dir.to_owned());
        stop_data_dir(&dir.join("data"));
        let pg = LocalPostgres {
            dir: dir.to_owned(),
            port: TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
            password_file: dir.join("pw"),
            stop_on_drop: true,
        };
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let pg_ctl = pg_bin("pg_ctl").context("pg_ctl is not installed")?;
        let mut c = as_pg_user(&pg_ctl);
        c.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
                self.port,
                self.dir.display()
            ));
        c.arg("-l")
            .arg(self.dir.join("pg.log"))
            .args(["-w", "start"]);
        run(c, "pg_ctl start")
    }

    /// `[[resources]]` TOML for an edge serving this cluster as `name`.
    pub fn resource_toml(&self, name: &str, labels: &str) -> String {
        format!(
            "[[resources]]\nname = \"{name}\"\nkind = \"postgres\"\nlabels = {{ {labels} }}\n[resources.postgres]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\ndatabase = \"postgres\"\npassword_file = \"{}\"\n",
            self.port,
            self.password_file.display()
        )
    }

    /// libpq environment for a direct connection as the superuser.
    pub fn direct_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGDATABASE".into(), "postgres".into()),
            ("PGPASSWORD".into(), PASSWORD.into()),
            ("PGSSLMODE".into(), "disable".into()),
        ]
    }

    pub fn stop(&self) {
        stop_data_dir(&self.dir.join("data"));
    }
}

/// Stops the server of a data directory, if it runs.
pub fn stop_data_dir(data: &Path) {
    if let Some(pg_ctl) = pg_bin("pg_ctl") {
        let mut c = as_pg_user(&pg_ctl);
        c.arg("-D").arg(data).args(["-m", "fast", "stop"]);
        let _ = c.output();
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.stop();
        }
    }
}
