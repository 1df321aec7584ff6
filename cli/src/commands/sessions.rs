//! `custody sessions list|show|replay`

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use custody_cli::client::Client;
use custody_proto::evidence::v1 as ev;
use custody_proto::export::{event_json, fmt_time};
use custody_proto::v1 as api;

#[derive(Subcommand)]
pub enum SessionsCmd {
    /// List recorded sessions (admins and auditors see all; others their own).
    List {
        /// issuer|subject, a subject or an email.
        #[arg(long)]
        identity: Option<String>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// RFC 3339 time or milliseconds since the epoch.
        #[arg(long, value_parser = parse_time)]
        since: Option<u64>,
        #[arg(long, value_parser = parse_time)]
        until: Option<u64>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Sessions open now, on every node, instead of recorded ones.
        #[arg(long, conflicts_with_all = ["identity", "resource", "region", "since", "until"])]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a live session on whichever node hosts it (admins). The session
    /// records who ended it and why.
    Kill {
        id: String,
        /// Why: recorded with the session's end.
        #[arg(long)]
        reason: String,
    },
    /// Print a session's full, verified event list.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Replay a session's terminal output with its original timing.
    Replay {
        id: String,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Write an asciicast v2 file instead of playing.
        #[arg(long)]
        asciicast: Option<std::path::PathBuf>,
    },
}

/// Milliseconds since the epoch, or an RFC 3339 UTC time (`2026-01-02T03:04:05Z`).
pub fn parse_time(s: &str) -> Result<u64, String> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = time_rfc3339(s).ok_or_else(|| {
        format!("{s:?} is neither milliseconds nor an RFC 3339 UTC time like 2026-01-02T03:04:05Z")
    })?;
    Ok(t)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` into milliseconds since the epoch.
fn time_rfc3339(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, clock) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut c = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (c.next()?.ok()?, c.next()?.ok()?, c.next()?.ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    let total = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms;
    u64::try_from(total).ok()
}

fn info_json(s: &api::SessionInfo) -> serde_json::Value {
    serde_json::json!({
        "session_id": s.session_id, "opened_at": fmt_time(s.opened_at_ms),
        "opened_at_ms": s.opened_at_ms, "closed_at_ms": s.closed_at_ms,
        "issuer": s.issuer, "subject": s.subject, "email": s.email,
        "client_kind": s.client_kind, "resource": s.resource, "resource_kind": s.resource_kind,
        "edge": s.edge, "edge_region": s.edge_region, "node_region": s.node_region,
        "command": s.command, "mode": s.mode, "closed": s.closed, "exit_code": s.exit_code,
        "signal": s.signal, "close_reason": s.close_reason, "events": s.events,
        "chunks": s.chunks, "raw_bytes": s.raw_bytes, "stored_bytes": s.stored_bytes,
        "head_sha256": s.head_sha256,
        "purged_at_ms": s.purged_at_ms, "purge_rule": s.purge_rule,
        "via": s.via, "actor": s.actor,
    })
}

pub async fn run(cmd: SessionsCmd) -> anyhow::Result<()> {
    let client = Client::from_env()?;
    match cmd {
        SessionsCmd::List {
            live: true, json, ..
        } => {
            let r = client.list_live_sessions().await?;
            if json {
                let v: Vec<_> = r
                    .sessions
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "session_id": s.session_id, "principal": s.principal,
                            "identity": s.identity, "resource": s.resource, "via": s.via,
                            "node_id": s.node_id, "opened_at_ms": s.opened_at_ms,
                            "opened_at": fmt_time(s.opened_at_ms), "command": s.command,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "sessions": v, "unreachable_nodes": r.unreachable_nodes,
                    }))?
                );
                return Ok(());
            }
            println!(
                "{:<32} {:<24} {:<20} {:<14} {:<9} {:<5} COMMAND",
                "SESSION", "OPENED", "WHO", "RESOURCE", "VIA", "NODE"
            );
            for s in &r.sessions {
                println!(
                    "{:<32} {:<24} {:<20} {:<14} {:<9} {:<5} {}",
                    s.session_id,
                    fmt_time(s.opened_at_ms),
                    s.identity,
                    s.resource,
                    s.via,
                    s.node_id,
                    s.command
                );
            }
            if !r.unreachable_nodes.is_empty() {
                eprintln!(
                    "nodes {:?} did not answer: their sessions are not listed",
                    r.unreachable_nodes
                );
            }
        }
        SessionsCmd::Kill { id, reason } => {
            let node = client.kill_session(&id, &reason).await?;
            println!("ended session {id} on node {node}");
        }
        SessionsCmd::List {
            identity,
            resource,
            region,
            since,
            until,
            limit,
            json,
            ..
        } => {
            let list = client
                .list_sessions(api::ListSessionsRequest {
                    identity: identity.unwrap_or_default(),
                    resource: resource.unwrap_or_default(),
                    region: region.unwrap_or_default(),
                    since_ms: since.unwrap_or(0),
                    until_ms: until.unwrap_or(0),
                    limit,
                })
                .await?;
            if json {
                let v: Vec<_> = list.iter().map(info_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<32} {:<24} {:<16} {:<14} {:<8} {:<6} COMMAND",
                "SESSION", "OPENED", "WHO", "RESOURCE", "REGION", "EXIT"
            );
            for s in list {
                let exit = if !s.closed {
                    "open".to_string()
                } else if s.signal != 0 {
                    format!("sig{}", s.signal)
                } else {
                    s.exit_code.to_string()
                };
                println!(
                    "{:<32} {:<24} {:<16} {:<14} {:<8} {:<6} {}",
                    s.session_id,
                    fmt_time(s.opened_at_ms),
                    s.subject,
                    s.resource,
                    s.node_region,
                    exit,
                    s.command
                );
            }
        }
        SessionsCmd::Show { id, json } => {
            let r = client.get_session(&id).await?;
            let info = r.session.unwrap_or_default();
            if json {
                let v = serde_json::json!({
                    "session": info_json(&info),
                    "events": r.events.iter().map(event_json).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "session {}  ({} events, {} chunks, chain head {})",
                info.session_id, info.events, info.chunks, info.head_sha256
            );
            let who = if info.actor.is_empty() {
                info.subject.clone()
            } else {
                format!("{} acting for {}", info.actor, info.subject)
            };
            println!(
                "by {who} ({}) via {} on {}: {}",
                info.client_kind,
                if info.via.is_empty() { "?" } else { &info.via },
                info.resource,
                info.command
            );
            if info.purged_at_ms != 0 {
                println!(
                    "evidence purged at {} by retention rule {:?}; only this record remains",
                    fmt_time(info.purged_at_ms),
                    info.purge_rule
                );
            }
            // An event recorded in fragments is shown whole.
            for e in &custody_proto::chain::join_fragments(r.events) {
                let j = event_json(e);
                let body = match &e.kind {
                    Some(ev::event::Kind::Output(o)) => format!(
                        "{}{} {:?}{}",
                        o.stream,
                        if o.continued { " (continued)" } else { "" },
                        String::from_utf8_lossy(&o.data),
                        if o.truncated {
                            " (recording cut here)"
                        } else {
                            ""
                        }
                    ),
                    _ => j["event"].to_string(),
                };
                println!(
                    "{:>5} {} {:<15} {}",
                    e.seq,
                    fmt_time(e.at_ms),
                    j["type"].as_str().unwrap_or(""),
                    body
                );
            }
        }
        SessionsCmd::Replay {
            id,
            speed,
            asciicast,
        } => {
            if !(speed > 0.0 && speed.is_finite()) {
                anyhow::bail!("--speed must be a positive number");
            }
            let r = client.get_session(&id).await?;
            let info = r.session.unwrap_or_default();
            let events = custody_proto::chain::join_fragments(r.events);
            let outputs: Vec<(u64, &ev::Output)> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    Some(ev::event::Kind::Output(o)) if !is_input(&o.stream) => Some((e.at_ms, o)),
                    _ => None,
                })
                .collect();
            let start = events.first().map_or(0, |e| e.at_ms);
            if let Some(path) = asciicast {
                let mut f = std::fs::File::create(&path)
                    .with_context(|| format!("create {}", path.display()))?;
                let lines = asciicast_lines(&events, &info);
                for line in &lines {
                    writeln!(f, "{line}")?;
                }
                eprintln!("wrote {} ({} events)", path.display(), lines.len() - 1);
                return Ok(());
            }
            let mut last = start;
            let mut out = std::io::stdout();
            for (at, o) in outputs {
                let gap = Duration::from_millis(at.saturating_sub(last)).div_f64(speed);
                tokio::time::sleep(gap).await;
                last = at;
                out.write_all(&o.data)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Decodes UTF-8 arriving in chunks: a character split between two chunks
/// is kept until its end arrives; bytes that are not UTF-8 become U+FFFD.
#[derive(Default)]
pub struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    pub fn push(&mut self, data: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        // An incomplete sequence at the end waits for the next chunk.
        let keep = incomplete_tail(&buf);
        self.carry = buf.split_off(buf.len() - keep);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// How many bytes at the end of `b` begin a character that is not complete.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            continue;
        }
        let need = match c {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Whether a recorded stream is the caller's input (not replayed as output).
fn is_input(stream: &str) -> bool {
    stream == "stdin" || stream == "keystrokes"
}

/// A session as asciicast v2 lines: the header (the terminal's size when the
/// session recorded one: an SSH pty request, else its first resize), then
/// output ("o"), input ("i", a terminal's keystrokes, for those allowed to
/// read them) and resize ("r") events.
pub fn asciicast_lines(events: &[ev::Event], info: &api::SessionInfo) -> Vec<serde_json::Value> {
    let start = events.first().map_or(0, |e| e.at_ms);
    let (mut width, mut height) = (120, 40);
    if let Some(c) = events.iter().find_map(|e| match &e.kind {
        Some(ev::event::Kind::SshChannel(c)) if c.cols > 0 && c.rows > 0 => Some(c),
        _ => None,
    }) {
        (width, height) = (c.cols, c.rows);
    } else if let Some(r) = events.iter().find_map(|e| match &e.kind {
        // A terminal that tells its size once the stream is open (kubectl
        // exec -t, on the resize channel; the process may print first).
        Some(ev::event::Kind::Resize(r)) if r.cols > 0 && r.rows > 0 => Some(r),
        _ => None,
    }) {
        (width, height) = (r.cols, r.rows);
    }
    let mut lines = vec![serde_json::json!({
        "version": 2, "width": width, "height": height,
        "timestamp": info.opened_at_ms / 1000,
        "title": format!("{} on {}", info.command, info.resource),
    })];
    let mut text = Utf8Chunks::default();
    let mut keys = Utf8Chunks::default();
    for e in events {
        let t = e.at_ms.saturating_sub(start) as f64 / 1000.0;
        match &e.kind {
            Some(ev::event::Kind::Output(o)) if o.stream == "keystrokes" => {
                let s = keys.push(&o.data);
                if !s.is_empty() {
                    lines.push(serde_json::json!([t, "i", s]));
                }
            }
            Some(ev::event::Kind::Output(o)) if !is_input(&o.stream) => {
                let s = text.push(&o.data);
                if !s.is_empty() {
                    lines.push(serde_json::json!([t, "o", s]));
                }
            }
            Some(ev::event::Kind::Resize(r)) => {
                lines.push(serde_json::json!([
                    t,
                    "r",
                    format!("{}x{}", r.cols, r.rows)
                ]));
            }
            _ => {}
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_joined() {
        let mut d = Utf8Chunks::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push(&[b'a', euro[0]]), "a");
        assert_eq!(d.push(&euro[1..2]), "");
        assert_eq!(d.push(&[euro[2], b'b']), "€b");
        assert_eq!(d.push(&[0xff, b'c']), "\u{fffd}c");
    }

    #[test]
    fn asciicast_has_the_terminal_size_and_resizes() {
        let ev = |seq: u64, at_ms: u64, kind: ev::event::Kind| ev::Event {
            seq,
            at_ms,
            kind: Some(kind),
            ..Default::default()
        };
        let events = vec![
            ev(
                0,
                1000,
                ev::event::Kind::SshChannel(ev::SshChannel {
                    cols: 100,
                    rows: 30,
                    ..Default::default()
                }),
            ),
            ev(
                1,
                1500,
                ev::event::Kind::Output(ev::Output {
                    stream: "stdout".into(),
                    data: "héllo".as_bytes()[..2].to_vec().into(),
                    ..Default::default()
                }),
            ),
            ev(
                2,
                1600,
                ev::event::Kind::Output(ev::Output {
                    stream: "stdout".into(),
                    data: "héllo".as_bytes()[2..].to_vec().into(),
                    ..Default::default()
                }),
            ),
            ev(
                3,
                2000,
                ev::event::Kind::Resize(ev::Resize { cols: 80, rows: 24 }),
            ),
        ];
        let lines = asciicast_lines(&events, &api::SessionInfo::default());
        assert_eq!(
            (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
            (Some(100), Some(30))
        );
        assert_eq!(lines[1], serde_json::json!([0.5, "o", "h"]));
        assert_eq!(lines[2], serde_json::json!([0.6, "o", "éllo"]));
        assert_eq!(lines[3], serde_json::json!([1.0, "r", "80x24"]));
        // Without a pty request, the first resize sizes the terminal
        // (kubectl exec -t), and none leaves the default.
        let lines = asciicast_lines(&events[1..], &api::SessionInfo::default());
        assert_eq!(lines[0]["width"].as_u64(), Some(80));
        let lines = asciicast_lines(&events[1..3], &api::SessionInfo::default());
        assert_eq!(lines[0]["width"].as_u64(), Some(120));
        let mut sized = vec![ev(
            0,
            1000,
            ev::event::Kind::Resize(ev::Resize { cols: 90, rows: 20 }),
        )];
        sized.extend_from_slice(&events[1..]);
        let lines = asciicast_lines(&sized, &api::SessionInfo::default());
        assert_eq!(
            (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
            (Some(90), Some(20))
        );
    }

    #[test]
    fn times_round_trip() {
        for ms in [0u64, 1_700_000_000_123, 1_767_225_600_000] {
            assert_eq!(parse_time(&fmt_time(ms)), Ok(ms));
        }
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Ok(1_767_225_600_000));
        assert_eq!(parse_time("42"), Ok(42));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }
}
