//! Where the SIEM stream goes: a file (rotated by size), syslog (RFC 5424,
//! octet-counted frames over TCP or TLS, reconnecting), or an HTTP endpoint
//! (JSON arrays, batched, retried with backoff). Each sink runs on its own
//! task with its own queue, so a slow one never holds up another.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;

use super::{AuditEvent, DROPPED};

/// The form events are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ocsf,
    Native,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File {
        path: PathBuf,
        /// Rotate past this size.
        max_bytes: u64,
        /// Rotated files kept (`path.1` .. `path.keep`).
        keep: u32,
    },
    Syslog {
        address: String,
        /// TLS, trusting `ca_file`.
        tls: Option<PathBuf>,
    },
    Http {
        url: String,
        /// Roots for an `https` URL beyond none (the endpoint's CA).
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub kind: SinkKind,
    pub format: Format,
}

fn render(e: &AuditEvent, format: Format, node: u64, cluster: &str) -> String {
    match format {
        Format::Ocsf => super::ocsf::to_ocsf(e, node, cluster),
        Format::Native => super::ocsf::to_native(e, node, cluster),
    }
    .to_string()
}

pub async fn run(c: SinkConfig, rx: mpsc::Receiver<AuditEvent>, node: u64, cluster: String) {
    let render = move |e: &AuditEvent| render(e, c.format, node, &cluster);
    match c.kind {
        SinkKind::File {
            path,
            max_bytes,
            keep,
        } => file(path, max_bytes, keep, rx, render).await,
        SinkKind::Syslog { address, tls } => syslog(address, tls, rx, render).await,
        SinkKind::Http { url, ca_file } => http(url, ca_file, rx, render).await,
    }
}

fn drop_one() {
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

async fn file(
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    mut rx: mpsc::Receiver<AuditEvent>,
    render: impl Fn(&AuditEvent) -> String,
) {
    let open = |p: &PathBuf| {
        let mut o = std::fs::OpenOptions::new();
        o.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        o.open(p)
    };
    let mut out: Option<std::fs::File> = None;
    while let Some(e) = rx.recv().await {
        let line = render(&e) + "\n";
        if out.is_none() {
            match open(&path) {
                Ok(f) => out = Some(f),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "the SIEM file cannot be opened");
                    drop_one();
                    continue;
                }
            }
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size > 0 && size + line.len() as u64 > max_bytes {
            out = None;
            for i in (1..keep).rev() {
                let _ = std::fs::rename(rotated(&path, i), rotated(&path, i + 1));
            }
            if keep > 0 {
                let _ = std::fs::rename(&path, rotated(&path, 1));
            } else {
                let _ = std::fs::remove_file(&path);
            }
            match open(&path) {
                Ok(f) => out = Some(f),
                Err(_) => {
                    drop_one();
                    continue;
                }
            }
        }
        if let Some(f) = out.as_mut() {
            if std::io::Write::write_all(f, line.as_bytes()).is_err() {
                out = None;
                drop_one();
            }
        }
    }
}

fn rotated(path: &std::path::Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

type Conn = Box<dyn AsyncWrite + Send + Unpin>;

async fn connect(address: &str, tls: &Option<PathBuf>) -> Result<Conn, String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let Some(ca) = tls else {
        return Ok(Box::new(tcp));
    };
    let pem = std::fs::read(ca).map_err(|e| format!("read {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| e.to_string())?;
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Box::new(s))
}

/// An RFC 5424 message for `e` (facility: log audit), framed by octet
/// counting (RFC 6587).
fn syslog_frame(e: &AuditEvent, body: &str, host: &str) -> String {
    let severity = match e.level.as_str() {
        "ERROR" => 3,
        "WARN" => 4,
        _ => 6,
    };
    let pri = 13 * 8 + severity;
    let msgid: String = e.name.chars().take(32).collect();
    let msg = format!(
        "<{pri}>1 {} {host} custody-coordinator {} {msgid} - {body}",
        custody_proto::export::fmt_time(e.at_ms),
        std::process::id()
    );
    format!("{} {msg}", msg.len())
}

async fn syslog(
    address: String,
    tls: Option<PathBuf>,
    mut rx: mpsc::Receiver<AuditEvent>,
    render: impl Fn(&AuditEvent) -> String,
) {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
        .unwrap_or_else(|| "-".into());
    // Kept while the receiver is away, up to a bound.
    let mut pending: VecDeque<String> = VecDeque::new();
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(200);
    while let Some(e) = rx.recv().await {
        if pending.len() >= 4096 {
            pending.pop_front();
            drop_one();
        }
        pending.push_back(syslog_frame(&e, &render(&e), &host));
        while let Some(frame) = pending.front() {
            if conn.is_none() {
                match connect(&address, &tls).await {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = Duration::from_millis(200);
                    }
                    Err(err) => {
                        tracing::warn!(%address, error = %err, "the syslog receiver cannot be reached");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        break;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { break };
            let sent = async {
                c.write_all(frame.as_bytes()).await?;
                c.flush().await
            }
            .await;
            match sent {
                Ok(()) => {
                    pending.pop_front();
                }
                Err(_) => conn = None,
            }
        }
    }
}

async fn http(
    url: String,
    ca_file: Option<PathBuf>,
    mut rx: mpsc::Receiver<AuditEvent>,
    render: impl Fn(&AuditEvent) -> String,
) {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(ca) = &ca_file {
        match std::fs::read(ca)
            .map_err(|e| e.to_string())
            .and_then(|p| reqwest::Certificate::from_pem(&p).map_err(|e| e.to_string()))
        {
            Ok(c) => b = b.add_root_certificate(c),
            Err(e) => {
                tracing::warn!(ca = %ca.display(), error = %e, "the SIEM endpoint's CA cannot be read")
            }
        }
    }
    let Ok(client) = b.build() else {
        return;
    };
    while let Some(first) = rx.recv().await {
        // A batch: what is queued now, up to 256 events.
        let mut batch = vec![render(&first)];
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(e) => batch.push(render(&e)),
                Err(_) => break,
            }
        }
        let body = format!("[{}]", batch.join(","));
        let mut delay = Duration::from_millis(500);
        let mut sent = false;
        for _ in 0..5 {
            match client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    sent = true;
                    break;
                }
                Ok(r) => {
                    tracing::warn!(%url, status = %r.status(), "the SIEM endpoint refused a batch")
                }
                Err(e) => tracing::warn!(%url, error = %e, "the SIEM endpoint cannot be reached"),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        if !sent {
            DROPPED.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_frames_are_rfc5424_with_octet_counts() {
        let e = AuditEvent {
            seq: 1,
            at_ms: 1_765_000_000_123,
            level: "WARN".into(),
            name: "auth_rejected".into(),
            message: String::new(),
            fields: Default::default(),
        };
        let f = syslog_frame(&e, "{\"a\":1}", "host1");
        let (len, msg) = f.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert!(msg.starts_with("<108>1 "), "{msg}");
        assert!(msg.contains(" host1 custody-coordinator "), "{msg}");
        assert!(msg.ends_with(" auth_rejected - {\"a\":1}"), "{msg}");
    }

    #[tokio::test]
    async fn the_file_sink_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(file(path.clone(), 100, 2, rx, |e| format!("{:060}", e.seq)));
        for seq in 0..5 {
            tx.send(AuditEvent {
                seq,
                at_ms: 0,
                level: "INFO".into(),
                name: "x".into(),
                message: String::new(),
                fields: Default::default(),
            })
            .await
            .unwrap();
        }
        drop(tx);
        task.await.unwrap();
        // 61 bytes a line, at most 100 a file: one line each, two kept.
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(path.clone()).trim(), format!("{:060}", 4));
        assert_eq!(read(rotated(&path, 1)).trim(), format!("{:060}", 3));
        assert_eq!(read(rotated(&path, 2)).trim(), format!("{:060}", 2));
        assert!(!rotated(&path, 3).exists());
    }
}
