//! `custody export` and `custody verify`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use custody_cli::client::Client;
use custody_proto::chain::{open_chunk, verify_chain};
use custody_proto::evidence::v1 as ev;
use custody_proto::export::{chunk_from_json, event_json, hex};
use custody_proto::ledger;
use custody_proto::v1 as api;

use super::sessions::parse_time;

/// The files of an export besides the manifest (v1 has the first three).
pub const FILES: [&str; 4] = [
    "chunks.jsonl",
    "events.jsonl",
    "sessions.csv",
    "ledger.jsonl",
];

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
    /// (sessions.csv), ocsf (ocsf.jsonl: the sessions' openings, commands,
    /// tool calls, approvals, outcomes and closings as OCSF API Activity,
    /// derived from events.jsonl after it verified; not under the signature).
    /// The manifest always covers jsonl and csv.
    #[arg(long, value_delimiter = ',', default_value = "jsonl,csv")]
    format: Vec<String>,
    /// Continue from a previous export: the evidence ledger range starts
    /// where that one ended (check the pair with `verify --previous`).
    #[arg(long)]
    after: Option<PathBuf>,
}

pub async fn export(a: ExportArgs) -> anyhow::Result<()> {
    for f in &a.format {
        if !matches!(f.as_str(), "jsonl" | "csv" | "ocsf") {
            bail!("unknown format {f:?} (use jsonl, csv, ocsf)");
        }
    }
    if a.out.exists() && std::fs::read_dir(&a.out)?.next().is_some() {
        bail!("{} is not empty", a.out.display());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let after_ledger_seq = match &a.after {
        Some(d) => ledger_end_of(d)?,
        None => 0,
    };
    let client = Client::from_env()?;
    let mut stream = client
        .export(api::ExportRequest {
            from_ms: a.from.unwrap_or(0),
            to_ms: a.to.unwrap_or(0),
            region: a.region.unwrap_or_default(),
            resource: a.resource.unwrap_or_default(),
            identity: a.identity.unwrap_or_default(),
            after_ledger_seq,
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
    if a.format.iter().any(|f| f == "ocsf") {
        let events = std::fs::File::open(a.out.join("events.jsonl"))?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(a.out.join("ocsf.jsonl"))?);
        for line in std::io::BufReader::new(events).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if let Some(o) = custody_proto::ocsf::from_evidence(&v) {
                writeln!(out, "{o}")?;
            }
        }
        out.flush()?;
    }
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
    for (sid, why) in &report.unreadable {
        eprintln!("custody: session {sid} could not be read and is marked unreadable: {why}");
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct Report {
    pub format: String,
    pub sessions: usize,
    pub events: usize,
    /// Sessions the export says cannot be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// The ledger range (format v2).
    pub ledger: Option<LedgerRange>,
}

/// An export's evidence-ledger range, as its manifest states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRange {
    pub from_seq: u64,
    pub to_seq: u64,
    pub from_sha256: String,
    pub head_sha256: String,
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    let d: [u8; 32] = h.finalize().into();
    Ok(hex(&d))
}

const V1: &str = "custody-export-v1";
const V2: &str = "custody-export-v2";

/// The files of a format.
fn files_of(format: &str) -> &'static [&'static str] {
    if format == V1 {
        &FILES[..3]
    } else {
        &FILES
    }
}

/// Reads a JSONL file, one parsed value per line.
fn jsonl<T>(
    path: &Path,
    name: &str,
    parse: impl Fn(&serde_json::Value) -> Result<T, String>,
) -> anyhow::Result<Vec<T>> {
    let f = std::fs::File::open(path).with_context(|| format!("open {name}"))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{name} line {}: not JSON", n + 1))?;
        out.push(parse(&v).map_err(|e| anyhow::anyhow!("{name} line {}: {e}", n + 1))?);
    }
    Ok(out)
}

/// Checks the manifest's signature against the public key (base64 Ed25519).
fn check_signature(dir: &Path, manifest: &[u8], public_key: &str) -> anyhow::Result<()> {
    let pk = base64::engine::general_purpose::STANDARD
        .decode(public_key.trim())
        .context("the public key is not base64")?;
    let sig_text =
        std::fs::read_to_string(dir.join("manifest.sig")).context("read manifest.sig")?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(sig_text.trim())
        .context("manifest.sig is not base64")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
        .verify(manifest, &sig)
        .map_err(|_| {
            anyhow::anyhow!(
                "manifest.sig: the signature does not match manifest.json and the public key"
            )
        })
}

/// Verifies an export directory. With `public_key` (base64 Ed25519), checks
/// the signature; every other check runs regardless, and every problem
/// found is reported (one per line), so a tampered export names each
/// session it touched.
pub fn verify_dir(dir: &Path, public_key: Option<&str>) -> anyhow::Result<Report> {
    let manifest_bytes = std::fs::read(dir.join("manifest.json")).context("read manifest.json")?;
    let mut problems: Vec<String> = Vec::new();
    if let Some(pk) = public_key {
        if let Err(e) = check_signature(dir, &manifest_bytes, pk) {
            problems.push(e.to_string());
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest_bytes).context("manifest.json is not JSON")?;
    let format = manifest["format"].as_str().unwrap_or_default().to_owned();
    if format != V1 && format != V2 {
        bail!(
            "manifest.json: format {} is not one this custody verify reads ({V1}, {V2}); use a newer custody",
            manifest["format"]
        );
    }
    let files = manifest["files"]
        .as_array()
        .context("manifest.json: no files")?;
    for f in files {
        let name = f["name"]
            .as_str()
            .context("manifest.json: file without a name")?;
        if !files_of(&format).contains(&name) {
            problems.push(format!("manifest.json names an unexpected file {name:?}"));
            continue;
        }
        let path = dir.join(name);
        if !path.exists() && name != "chunks.jsonl" && name != "ledger.jsonl" {
            continue; // left out with --format
        }
        match sha256_file(&path) {
            Ok(got) if Some(got.as_str()) == f["sha256"].as_str() => {}
            Ok(_) => problems.push(format!(
                "{name}: SHA-256 differs from the manifest (the file was changed)"
            )),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    // Chains, from the chunks themselves.
    let chunks = jsonl(&dir.join("chunks.jsonl"), "chunks.jsonl", chunk_from_json)?;
    let mut by_session: BTreeMap<String, Vec<ev::Chunk>> = BTreeMap::new();
    for c in chunks {
        by_session.entry(c.session_id.clone()).or_default().push(c);
    }
    let listed = manifest["sessions"]
        .as_array()
        .context("manifest.json: no sessions")?;
    let mut report = Report {
        format: format.clone(),
        sessions: listed.len(),
        ..Report::default()
    };
    let mut expected_events = Vec::new();
    // Per listed session: (state, chain head, event count), and its opening
    // and closing events for the CSV check.
    let mut states: BTreeMap<String, (String, String, u64)> = BTreeMap::new();
    let mut csv_expect: Vec<(String, Option<ev::SessionOpened>, Option<String>)> = Vec::new();
    for s in listed {
        let sid = s["session_id"]
            .as_str()
            .context("manifest: session without id")?
            .to_owned();
        let state = match (format.as_str(), s["state"].as_str()) {
            (V1, _) if s["closed"].as_bool() == Some(true) => "closed",
            (V1, _) => "open",
            (_, Some(st)) => st,
            (_, None) => {
                problems.push(format!("session {sid}: the manifest gives no state"));
                continue;
            }
        }
        .to_owned();
        states.insert(
            sid.clone(),
            (
                state.clone(),
                s["chain_head"].as_str().unwrap_or_default().to_owned(),
                s["events"].as_u64().unwrap_or(0),
            ),
        );
        let chunks = by_session.remove(&sid).unwrap_or_default();
        match state.as_str() {
            "purged" => {
                if !chunks.is_empty() {
                    problems.push(format!(
                        "session {sid}: purged, yet chunks.jsonl holds {} of its chunks",
                        chunks.len()
                    ));
                }
                csv_expect.push((sid, None, None));
                continue;
            }
            "unreadable" => {
                let why = s["unreadable"].as_str().unwrap_or("no reason given");
                report.unreadable.push((sid.clone(), why.to_owned()));
                csv_expect.push((sid, None, None));
                continue;
            }
            "open" | "closed" => {}
            other => {
                problems.push(format!("session {sid}: unknown state {other:?}"));
                continue;
            }
        }
        if chunks.is_empty() {
            problems.push(format!("session {sid}: no chunks in chunks.jsonl"));
            continue;
        }
        let head = match verify_chain(&chunks) {
            Ok(h) => h,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        if s["chunks"].as_u64() != Some(chunks.len() as u64) {
            problems.push(format!(
                "session {sid}: {} chunks present, manifest says {} (a chunk is missing)",
                chunks.len(),
                s["chunks"]
            ));
        }
        if s["chain_head"].as_str() != Some(hex(&head).as_str()) {
            problems.push(format!(
                "session {sid}: chain head differs from the manifest"
            ));
        }
        let ends = chunks.last().is_some_and(|c| c.last);
        if (state == "closed") != ends {
            problems.push(if ends {
                format!("session {sid}: marked open, but its chain is closed")
            } else {
                format!(
                    "session {sid}: marked closed, but its chain ends without closing (cut short)"
                )
            });
        }
        let mut n = 0;
        let mut opened = None;
        let mut closed = None;
        for c in &chunks {
            match open_chunk(c) {
                Ok(events) => {
                    for e in events {
                        expected_events.push(event_json(&e).to_string());
                        match &e.kind {
                            Some(ev::event::Kind::Opened(o)) if opened.is_none() => {
                                opened = Some(o.clone())
                            }
                            Some(ev::event::Kind::Closed(c)) => closed = Some(c.reason.clone()),
                            _ => {}
                        }
                        n += 1;
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if s["events"].as_u64() != Some(n) {
            problems.push(format!(
                "session {sid}: {n} events in its chunks, manifest says {}",
                s["events"]
            ));
        }
        csv_expect.push((sid, opened, closed));
    }
    for (sid, chunks) in &by_session {
        problems.push(format!(
            "session {sid}: {} chunks in chunks.jsonl, but the manifest does not list it",
            chunks.len()
        ));
    }
    report.events = expected_events.len();
    check_events(dir, &expected_events, &mut problems)?;
    check_csv(dir, &csv_expect, &mut problems)?;
    if format == V2 {
        report.ledger = check_ledger(dir, &manifest, &states, &mut problems)?;
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(report)
}

/// `events.jsonl` (when kept) holds exactly the chunks' events, in order.
fn check_events(dir: &Path, expected: &[String], problems: &mut Vec<String>) -> anyhow::Result<()> {
    let events_path = dir.join("events.jsonl");
    if !events_path.exists() {
        return Ok(());
    }
    let f = std::fs::File::open(&events_path)?;
    let mut lines = std::io::BufReader::new(f).lines();
    for (i, want) in expected.iter().enumerate() {
        match lines.next() {
            Some(Ok(got)) if got == *want => {}
            Some(_) => {
                let sid = serde_json::from_str::<serde_json::Value>(want)
                    .ok()
                    .and_then(|v| v["session_id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                problems.push(format!(
                    "events.jsonl line {}: differs from the evidence chunks (session {sid})",
                    i + 1
                ));
                return Ok(());
            }
            None => {
                problems.push(format!(
                    "events.jsonl: ends at line {}; the chunks hold {} events",
                    i,
                    expected.len()
                ));
                return Ok(());
            }
        }
    }
    if lines.next().is_some() {
        problems.push("events.jsonl: more lines than the chunks hold".into());
    }
    Ok(())
}

/// Splits CSV text into records (RFC 4180 quoting).
fn csv_records(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rec = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => rec.push(std::mem::take(&mut field)),
            (false, '\n') => {
                rec.push(std::mem::take(&mut field));
                out.push(std::mem::take(&mut rec));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        out.push(rec);
    }
    out
}

/// `sessions.csv` (when kept) has one row per listed session, in order,
/// whose identity, resource, edge and close reason are the chunks' own.
fn check_csv(
    dir: &Path,
    expect: &[(String, Option<ev::SessionOpened>, Option<String>)],
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let path = dir.join("sessions.csv");
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).context("read sessions.csv")?;
    let rows = csv_records(&text);
    let body = rows.get(1..).unwrap_or_default();
    if body.len() != expect.len() {
        problems.push(format!(
            "sessions.csv: {} rows, the manifest lists {} sessions",
            body.len(),
            expect.len()
        ));
    }
    for (row, (sid, opened, closed)) in body.iter().zip(expect) {
        let col = |i: usize| row.get(i).map_or("", String::as_str);
        if col(0) != sid {
            problems.push(format!(
                "sessions.csv: row for {:?} where the manifest has session {sid}",
                col(0)
            ));
            continue;
        }
        if let Some(o) = opened {
            let id = o.identity.clone().unwrap_or_default();
            let want = [
                (1, id.issuer.as_str()),
                (2, id.subject.as_str()),
                (3, id.email.as_str()),
                (5, o.resource.as_str()),
                (6, o.resource_kind.as_str()),
                (7, o.node_region.as_str()),
                (8, o.edge_region.as_str()),
                (9, o.edge.as_str()),
            ];
            if want.iter().any(|(i, v)| col(*i) != *v) {
                problems.push(format!(
                    "sessions.csv: the row of session {sid} differs from its opening event"
                ));
            }
        }
        if let Some(reason) = closed {
            if col(16) != reason {
                problems.push(format!(
                    "sessions.csv: the close reason of session {sid} differs from its closing event"
                ));
            }
        }
    }
    Ok(())
}

/// The ledger range links from the manifest's start to its head, and every
/// session it names that the export's query selects is accounted for.
fn check_ledger(
    dir: &Path,
    manifest: &serde_json::Value,
    states: &BTreeMap<String, (String, String, u64)>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Option<LedgerRange>> {
    let l = &manifest["ledger"];
    let range = LedgerRange {
        from_seq: l["from_seq"]
            .as_u64()
            .context("manifest.json: no ledger.from_seq")?,
        to_seq: l["to_seq"]
            .as_u64()
            .context("manifest.json: no ledger.to_seq")?,
        from_sha256: l["from_sha256"]
            .as_str()
            .context("manifest.json: no ledger.from_sha256")?
            .to_owned(),
        head_sha256: l["head_sha256"]
            .as_str()
            .context("manifest.json: no ledger.head_sha256")?
            .to_owned(),
    };
    let entries = jsonl(
        &dir.join("ledger.jsonl"),
        "ledger.jsonl",
        ledger::entry_from_json,
    )?;
    let from_hash: [u8; 32] = custody_proto::export::unhex(&range.from_sha256)
        .and_then(|v| v.try_into().ok())
        .context("manifest.json: ledger.from_sha256 is not a SHA-256")?;
    match ledger::verify_range(&entries, range.from_seq, from_hash) {
        Ok(head) if hex(&head) == range.head_sha256 => {}
        Ok(_) => problems
            .push("ledger.jsonl: its entries do not end at the manifest's ledger head".into()),
        Err(e) => problems.push(format!("ledger.jsonl: {e}")),
    }
    let want = range.to_seq + 1 - range.from_seq.min(range.to_seq + 1);
    if entries.len() as u64 != want {
        problems.push(format!(
            "ledger.jsonl: {} entries, the manifest's range {}..{} has {want}",
            entries.len(),
            range.from_seq,
            range.to_seq
        ));
    }
    let q = &manifest["query"];
    let text = |k: &str| q[k].as_str().unwrap_or_default().to_owned();
    let selection = ledger::Selection {
        identity: text("identity"),
        resource: text("resource"),
        region: text("region"),
        from_ms: q["from_ms"].as_u64().unwrap_or(0),
        to_ms: q["to_ms"].as_u64().unwrap_or(0),
    };
    // The last word of the range on each selected session.
    let mut last: BTreeMap<&str, &ev::LedgerEntry> = BTreeMap::new();
    for e in entries.iter().filter(|e| selection.selects(e)) {
        last.insert(&e.session_id, e);
    }
    for (sid, e) in last {
        let Some((state, head, events)) = states.get(sid) else {
            problems.push(format!(
                "session {sid}: the ledger records it ({} in entry {}), but the export leaves it out",
                e.kind, e.seq
            ));
            continue;
        };
        match e.kind.as_str() {
            ledger::CLOSED if state == "unreadable" => {}
            ledger::CLOSED if state != "closed" && state != "purged" => problems.push(format!(
                "session {sid}: closed in ledger entry {}, but the export has it {state}",
                e.seq
            )),
            ledger::CLOSED if *head != hex(&e.chain_head) || *events != e.events => {
                problems.push(format!(
                    "session {sid}: its chain differs from the one the ledger closed in entry {} ({} events, head {})",
                    e.seq,
                    e.events,
                    hex(&e.chain_head)
                ))
            }
            ledger::PURGED if state != "purged" => problems.push(format!(
                "session {sid}: purged in ledger entry {}, but the export has it {state}",
                e.seq
            )),
            _ => {}
        }
    }
    Ok(Some(range))
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    dir: PathBuf,
    /// The cluster's evidence public key (base64, from `custody cluster status`),
    /// or a file holding it.
    #[arg(long, env = "CUSTODY_EVIDENCE_KEY")]
    public_key: Option<String>,
    /// The export before this one: checks that this one starts where it
    /// ended (same ledger entry, same hash), so nothing between them is
    /// missing.
    #[arg(long)]
    previous: Option<PathBuf>,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let key = match a.public_key {
        Some(k) if Path::new(&k).is_file() => std::fs::read_to_string(&k)?,
        Some(k) => k,
        None => bail!("give --public-key (the evidence public key from `custody cluster status`)"),
    };
    let r = verify_dir(&a.dir, Some(&key))?;
    if let Some(prev) = &a.previous {
        let old = verify_dir(prev, Some(&key))
            .with_context(|| format!("the previous export {} does not verify", prev.display()))?;
        check_link(&old, &r, prev)?;
    }
    for (sid, why) in &r.unreadable {
        println!("UNREADABLE: session {sid}: {why}");
    }
    match &r.ledger {
        Some(l) => println!(
            "OK: signature, file digests, {} session chains ({} events) and evidence ledger entries {}..{} (head {}) verified; every session of the range is accounted for{}",
            r.sessions,
            r.events,
            l.from_seq,
            l.to_seq,
            &l.head_sha256[..16.min(l.head_sha256.len())],
            if a.previous.is_some() { ", and the export follows the previous one with no gap" } else { "" }
        ),
        None => println!(
            "OK: signature, file digests and {} session chains ({} events) verified (format {V1}: it has no evidence ledger, so its completeness cannot be proven)",
            r.sessions, r.events
        ),
    }
    if !r.unreadable.is_empty() {
        println!(
            "{} session(s) could not be read; they are named above",
            r.unreadable.len()
        );
    }
    Ok(())
}

/// Two successive exports link: the new ledger range starts right after
/// the old one's, from the same hash.
fn check_link(old: &Report, new: &Report, prev: &Path) -> anyhow::Result<()> {
    let (Some(o), Some(n)) = (&old.ledger, &new.ledger) else {
        bail!(
            "--previous needs two exports with an evidence ledger ({V2}); {} is {}",
            prev.display(),
            old.format
        );
    };
    if n.from_seq != o.to_seq + 1 || n.from_sha256 != o.head_sha256 {
        bail!(
            "this export does not follow {}: it ended at ledger entry {} (head {}), this one starts after entry {} (hash {}); sessions between them may be missing",
            prev.display(),
            o.to_seq,
            o.head_sha256,
            n.from_seq.saturating_sub(1),
            n.from_sha256
        );
    }
    Ok(())
}

/// The ledger entry an export ended at (`--after DIR`).
fn ledger_end_of(dir: &Path) -> anyhow::Result<u64> {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("manifest.json"))
            .with_context(|| format!("read {}/manifest.json", dir.display()))?,
    )
    .with_context(|| format!("{}/manifest.json is not JSON", dir.display()))?;
    m["ledger"]["to_seq"].as_u64().with_context(|| {
        format!(
            "{} has no evidence ledger (format {}); export without --after",
            dir.display(),
            m["format"]
        )
    })
}
