//! `custody export` and `custody verify`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use custody_cli::client::Client;
use custody_proto::chain::{open_chunk, verify_chain};
use custody_proto::export::{chunk_from_json, event_json, hex};
use custody_proto::v1 as api;

use super::sessions::parse_time;

pub const FILES: [&str; 3] = ["chunks.jsonl", "events.jsonl", "sessions.csv"];

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Directory to write (created; must be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_parser = parse_time)]
    from: Option<u64>,
    #[arg(long, value_parser = parse_time)]
    to: Option<u64>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    resource: Option<String>,
    #[arg(long)]
    identity: Option<String>,
    /// Files to keep besides the chunks and manifest: jsonl (events.jsonl), csv
    /// (sessions.csv). The manifest always covers all of them.
    #[arg(long, value_delimiter = ',', default_value = "jsonl,csv")]
    format: Vec<String>,
}

pub async fn export(a: ExportArgs) -> anyhow::Result<()> {
    for f in &a.format {
        if f != "jsonl" && f != "csv" {
            bail!("unknown format {f:?} (use jsonl, csv)");
        }
    }
    if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        bail!("{} is not empty", a.out.display());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let client = Client::from_env()?;
    let mut stream = client
        .export(api::ExportRequest {
            from_ms: a.from.unwrap_or(0),
            to_ms: a.to.unwrap_or(0),
            region: a.region.unwrap_or_default(),
            resource: a.resource.unwrap_or_default(),
            identity: a.identity.unwrap_or_default(),
        })
        .await?;
    let tty = std::io::stderr().is_terminal();
    let mut current: Option<(String, std::fs::File)> = None;
    let mut signed = false;
    while let Some(f) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
    {
        match f.kind {
            Some(api::export_frame::Kind::File(name)) => {
                if !FILES.contains(&name.as_str()) {
                    bail!("the coordinator sent an unexpected file {name:?}");
                }
                let path = a.out.join(&name);
                current = Some((
                    name,
                    std::fs::File::create(&path)
                        .with_context(|| format!("create {}", path.display()))?,
                ));
            }
            Some(api::export_frame::Kind::Data(d)) => {
                let (_, file) = current.as_mut().context("data before a file")?;
                file.write_all(&d)?;
            }
            Some(api::export_frame::Kind::Progress(p)) if tty => {
                eprint!(
                    "\rexported {}/{} sessions",
                    p.sessions_done, p.sessions_total
                );
            }
            Some(api::export_frame::Kind::Progress(_)) => {}
            Some(api::export_frame::Kind::Manifest(m)) => {
                std::fs::write(a.out.join("manifest.json"), &m.manifest_json)?;
                let sig = base64::engine::general_purpose::STANDARD.encode(&m.signature) + "\n";
                std::fs::write(a.out.join("manifest.sig"), sig)?;
                signed = true;
            }
            None => {}
        }
    }
    if tty {
        eprintln!();
    }
    if !signed {
        bail!(
            "the export ended without a signed manifest; discard {}",
            a.out.display()
        );
    }
    // Check what was written before declaring success.
    let report = verify_dir(&a.out, None)?;
    for (keep, name) in [("jsonl", "events.jsonl"), ("csv", "sessions.csv")] {
        if !a.format.iter().any(|f| f == keep) {
            std::fs::remove_file(a.out.join(name))?;
        }
    }
    println!(
        "exported {} sessions ({} events) to {}",
        report.sessions,
        report.events,
        a.out.display()
    );
    Ok(())
}

#[derive(Debug, Default)]
pub struct Report {
    pub sessions: usize,
    pub events: usize,
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    let d: [u8; 32] = h.finalize().into();
    Ok(hex(&d))
}

/// Verifies an export directory. With `public_key` (base64 Ed25519), checks
/// the signature; every other check runs regardless. Returns the first
/// problem as the error.
pub fn verify_dir(dir: &Path, public_key: Option<&str>) -> anyhow::Result<Report> {
    let manifest_bytes = std::fs::read(dir.join("manifest.json")).context("read manifest.json")?;
    if let Some(pk) = public_key {
        let pk = base64::engine::general_purpose::STANDARD
            .decode(pk.trim())
            .context("the public key is not base64")?;
        let sig_text =
            std::fs::read_to_string(dir.join("manifest.sig")).context("read manifest.sig")?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig_text.trim())
            .context("manifest.sig is not base64")?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
            .verify(&manifest_bytes, &sig)
            .map_err(|_| {
                anyhow::anyhow!(
                    "manifest.sig: the signature does not match manifest.json and the public key"
                )
            })?;
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).context("manifest.json is not JSON")?;
    if manifest["format"] != "custody-export-v1" {
        bail!("manifest.json: unknown format {}", manifest["format"]);
    }
    let files = manifest["files"]
        .as_array()
        .context("manifest.json: no files")?;
    for f in files {
        let name = f["name"]
            .as_str()
            .context("manifest.json: file without a name")?;
        if !FILES.contains(&name) {
            bail!("manifest.json names an unexpected file {name:?}");
        }
        let path = dir.join(name);
        if !path.exists() && name != "chunks.jsonl" {
            continue; // left out with --format
        }
        let got = sha256_file(&path)?;
        if Some(got.as_str()) != f["sha256"].as_str() {
            bail!("{name}: SHA-256 differs from the manifest (the file was changed)");
        }
    }
    // Chains, from the chunks themselves.
    let chunks_file = std::fs::File::open(dir.join("chunks.jsonl")).context("open chunks.jsonl")?;
    let mut by_session: BTreeMap<String, Vec<custody_proto::evidence::v1::Chunk>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for (n, line) in std::io::BufReader::new(chunks_file).lines().enumerate() {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("chunks.jsonl line {}: not JSON", n + 1))?;
        let c =
            chunk_from_json(&v).map_err(|e| anyhow::anyhow!("chunks.jsonl line {}: {e}", n + 1))?;
        if !by_session.contains_key(&c.session_id) {
            order.push(c.session_id.clone());
        }
        by_session.entry(c.session_id.clone()).or_default().push(c);
    }
    let listed = manifest["sessions"]
        .as_array()
        .context("manifest.json: no sessions")?;
    if listed.len() != by_session.len() {
        bail!(
            "manifest lists {} sessions; chunks.jsonl holds {}",
            listed.len(),
            by_session.len()
        );
    }
    let mut expected_events = Vec::new();
    for s in listed {
        let sid = s["session_id"]
            .as_str()
            .context("manifest: session without id")?;
        let chunks = by_session
            .get(sid)
            .with_context(|| format!("session {sid}: no chunks in chunks.jsonl"))?;
        let head = verify_chain(chunks).map_err(|e| anyhow::anyhow!("{e}"))?;
        if s["chunks"].as_u64() != Some(chunks.len() as u64) {
            bail!(
                "session {sid}: {} chunks present, manifest says {} (a chunk is missing)",
                chunks.len(),
                s["chunks"]
            );
        }
        if s["chain_head"].as_str() != Some(hex(&head).as_str()) {
            bail!("session {sid}: chain head differs from the manifest");
        }
        let mut n = 0;
        for c in chunks {
            for e in open_chunk(c).map_err(|e| anyhow::anyhow!("{e}"))? {
                expected_events.push(event_json(&e).to_string());
                n += 1;
            }
        }
        if s["events"].as_u64() != Some(n) {
            bail!(
                "session {sid}: {n} events in its chunks, manifest says {}",
                s["events"]
            );
        }
    }
    let events_path = dir.join("events.jsonl");
    if events_path.exists() {
        let f = std::fs::File::open(&events_path)?;
        let mut lines = std::io::BufReader::new(f).lines();
        for (i, want) in expected_events.iter().enumerate() {
            match lines.next() {
                Some(Ok(got)) if got == *want => {}
                Some(_) => bail!(
                    "events.jsonl line {}: differs from the evidence chunks",
                    i + 1
                ),
                None => bail!(
                    "events.jsonl: ends at line {}; the chunks hold {} events",
                    i,
                    expected_events.len()
                ),
            }
        }
        if lines.next().is_some() {
            bail!("events.jsonl: more lines than the chunks hold");
        }
    }
    Ok(Report {
        sessions: by_session.len(),
        events: expected_events.len(),
    })
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    dir: PathBuf,
    /// The cluster's evidence public key (base64, from `custody cluster status`),
    /// or a file holding it.
    #[arg(long, env = "CUSTODY_EVIDENCE_KEY")]
    public_key: Option<String>,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let key = match a.public_key {
        Some(k) if Path::new(&k).is_file() => std::fs::read_to_string(&k)?,
        Some(k) => k,
        None => bail!("give --public-key (the evidence public key from `custody cluster status`)"),
    };
    let r = verify_dir(&a.dir, Some(&key))?;
    println!(
        "OK: signature, file digests and {} session chains ({} events) verified",
        r.sessions, r.events
    );
    Ok(())
}
