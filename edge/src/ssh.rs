//! The `ssh` connector: one session is one channel on the target's sshd,
//! over a connection of its own that only this edge can open. The key or
//! password stays here; the target's host key must match a pin (known_hosts
//! lines or keys in the configuration), or be learned once when the resource
//! trusts on first use. The presented key's fingerprint goes back to the
//! coordinator, which records it, also when it is refused.
//!
//! Flow control: russh reopens windows when data arrives, so output taken
//! off the target's connection is bounded by a [`Valve`] that yields while
//! input waits to be written through the same connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::ssh_key::{HashAlg, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect, Pty};
use tokio::sync::mpsc;

use custody_proto::flow::Valve;
use custody_proto::frame::{read_frame, write_frame};
use custody_proto::ssh as wire;
use custody_proto::tunnel::v1 as t;

use crate::config::SshConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Output taken off the target's connection and not yet sent on.
const SOFT_BOUND: u64 = 4 << 20;
const HARD_BOUND: u64 = 256 << 20;

fn frame(kind: t::session_frame::Kind) -> t::SessionFrame {
    t::SessionFrame { kind: Some(kind) }
}

/// What the target must present: one of these keys, or a host certificate
/// one of these authorities signed.
#[derive(Debug, Default)]
pub struct Pins {
    pub keys: Vec<PublicKey>,
    pub cas: Vec<PublicKey>,
}

impl Pins {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.cas.is_empty()
    }
}

fn key_line(what: &str, k: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(k.trim())
        .map_err(|e| format!("{what} entry {k:?} is not an OpenSSH public key: {e}"))
}

/// Reads the pins for `host:port`: the configured keys and authorities, and
/// the lines of the known_hosts file whose patterns name it. `@revoked`
/// lines and hashed names are refused, so a pin is never silently ignored.
pub fn pinned_keys(cfg: &SshConfig) -> Result<Pins, String> {
    let mut pins = Pins::default();
    for k in &cfg.host_keys {
        pins.keys.push(key_line("host_keys", k)?);
    }
    for k in &cfg.host_cas {
        pins.cas.push(key_line("host_cas", k)?);
    }
    if let Some(path) = &cfg.known_hosts {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("read known_hosts {}: {e}", path.display()))?;
        let found = known_hosts_keys(&text, &cfg.host, cfg.port)?;
        pins.keys.extend(found.keys);
        pins.cas.extend(found.cas);
    }
    Ok(pins)
}

/// Whether known_hosts `pattern` (`*` and `?` wildcards) names `name`.
fn host_pattern(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| go(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && go(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    // Host names are short; the backtracking is bounded by them.
    pattern.len() <= 255 && go(pattern.as_bytes(), name.as_bytes())
}

/// The pins of `text` (known_hosts format) whose host patterns match:
/// plain lines pin keys, `@cert-authority` lines pin authorities.
pub fn known_hosts_keys(text: &str, host: &str, port: u16) -> Result<Pins, String> {
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut pins = Pins::default();
    for (n, line) in text.lines().enumerate() {
        let mut line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut ca = false;
        if let Some(rest) = line.strip_prefix("@cert-authority") {
            ca = true;
            line = rest.trim_start();
        } else if line.starts_with('@') {
            return Err(format!(
                "known_hosts line {}: only the @cert-authority marker is supported (not @revoked); remove the key instead",
                n + 1
            ));
        }
        let Some((patterns, key)) = line.split_once(char::is_whitespace) else {
            return Err(format!("known_hosts line {}: no key", n + 1));
        };
        if patterns.starts_with("|1|") {
            return Err(format!(
                "known_hosts line {}: hashed host names are not supported; write the name in clear",
                n + 1
            ));
        }
        let mut matched = false;
        for p in patterns.split(',') {
            if let Some(p) = p.strip_prefix('!') {
                if host_pattern(p, &name) {
                    matched = false;
                    break;
                }
            } else if host_pattern(p, &name) {
                matched = true;
            }
        }
        if matched {
            let key = PublicKey::from_openssh(key.trim())
                .map_err(|e| format!("known_hosts line {}: {e}", n + 1))?;
            if ca {
                pins.cas.push(key);
            } else {
                pins.keys.push(key);
            }
        }
    }
    Ok(pins)
}

/// Checks a host certificate: of host type, signed by a pinned authority,
/// valid now, and naming `host` among its principals.
pub fn check_host_certificate(
    cert: &russh::keys::Certificate,
    cas: &[PublicKey],
    host: &str,
    now_secs: u64,
) -> Result<(), String> {
    use russh::keys::ssh_key::certificate::CertType;
    if cert.cert_type() != CertType::Host {
        return Err("the target presented a user certificate as its host certificate".into());
    }
    let fingerprints: Vec<_> = cas.iter().map(|k| k.fingerprint(HashAlg::Sha256)).collect();
    let signer = cert.signature_key().fingerprint(HashAlg::Sha256);
    if !fingerprints.contains(&signer) {
        return Err(format!(
            "the target's host certificate is signed by {signer}, which is not a pinned authority"
        ));
    }
    cert.validate_at(now_secs, &fingerprints).map_err(|_| {
        format!(
            "the target's host certificate (serial {}) is not valid now or its signature does not verify",
            cert.serial()
        )
    })?;
    if !cert.valid_principals().iter().any(|p| p == host) {
        return Err(format!(
            "the target's host certificate names {:?}, not {host}",
            cert.valid_principals()
        ));
    }
    Ok(())
}

/// What the target presented, and what was decided about it.
#[derive(Debug, Clone, Default)]
struct Seen {
    fingerprint: String,
    learned: bool,
    refused: Option<String>,
}

struct Client {
    pins: Vec<PublicKey>,
    cas: Vec<PublicKey>,
    /// The name host certificates must carry.
    host: String,
    /// Where a key learned on first use is kept (trust-on-first-use only).
    learn_to: Option<PathBuf>,
    seen: Arc<Mutex<Seen>>,
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::Certificate(cert) = key {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let signer = cert.signature_key().fingerprint(HashAlg::Sha256);
            seen.fingerprint = format!(
                "{} (host certificate {:?}, serial {}, signed by {signer})",
                cert.public_key().fingerprint(HashAlg::Sha256),
                cert.key_id(),
                cert.serial()
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            return Ok(
                match check_host_certificate(cert, &self.cas, &self.host, now) {
                    Ok(()) => true,
                    Err(why) => {
                        seen.refused = Some(why);
                        false
                    }
                },
            );
        }
        let key = key.public_key();
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.fingerprint = fingerprint.clone();
        if self.pins.iter().any(|p| p.key_data() == key.key_data()) {
            return Ok(true);
        }
        if let (Some(path), true) = (&self.learn_to, self.pins.is_empty()) {
            let kept = key
                .to_openssh()
                .map_err(|e| e.to_string())
                .and_then(|line| learn(path, &line).map_err(|e| e.to_string()));
            if let Err(e) = kept {
                seen.refused = Some(format!("cannot keep the learned host key: {e}"));
                return Ok(false);
            }
            seen.learned = true;
            return Ok(true);
        }
        seen.refused = Some(if self.pins.is_empty() {
            format!("the target's host key {fingerprint} is not pinned, and the resource does not trust on first use")
        } else {
            let pinned: Vec<String> = self
                .pins
                .iter()
                .map(|p| p.fingerprint(HashAlg::Sha256).to_string())
                .collect();
            format!(
                "the target's host key {fingerprint} does not match the pinned {}",
                pinned.join(", ")
            )
        });
        Ok(false)
    }
}

fn learn(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{line}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Where a resource's learned host key is kept.
pub fn learned_key_path(data_dir: &Path, resource: &str) -> PathBuf {
    data_dir.join("ssh-learned").join(format!("{resource}.pub"))
}

async fn connect(
    cfg: &SshConfig,
    data_dir: &Path,
    resource: &str,
) -> Result<(russh::client::Handle<Client>, Seen), String> {
    let Pins {
        keys: mut pins,
        cas,
    } = pinned_keys(cfg)?;
    let mut learn_to = None;
    if cfg.trust_on_first_use && pins.is_empty() && cas.is_empty() {
        let path = learned_key_path(data_dir, resource);
        match std::fs::read_to_string(&path) {
            Ok(text) => pins.push(
                PublicKey::from_openssh(text.trim())
                    .map_err(|e| format!("learned host key {}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => learn_to = Some(path),
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    // Certificates are asked for only when an authority is pinned.
    let mut preferred = russh::Preferred::default();
    if !cas.is_empty() {
        preferred.host_key_certificates = preferred.key.clone();
    }
    let client = Client {
        pins,
        cas,
        host: cfg.host.clone(),
        learn_to,
        seen: seen.clone(),
    };
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("connect to {addr}: timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let config = Arc::new(russh::client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        nodelay: true,
        preferred,
        ..Default::default()
    });
    let connected = tokio::time::timeout(
        CONNECT_TIMEOUT,
        russh::client::connect_stream(config, tcp, client),
    )
    .await
    .map_err(|_| format!("SSH handshake with {addr}: timed out"))?;
    let seen_now = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut handle = match connected {
        Ok(h) => h,
        Err(e) => {
            return Err(match seen_now.refused {
                Some(why) => why,
                None => format!("SSH handshake with {addr}: {e}"),
            })
        }
    };
    let auth = if let Some(text) = cfg.private_key()? {
        let key = russh::keys::decode_secret_key(&text, None)
            .map_err(|e| format!("the edge's SSH key cannot be read: {e}"))?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| format!("SSH to {addr}: {e}"))?
            .flatten();
        handle
            .authenticate_publickey(&cfg.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
    } else if let Some(pw) = cfg.password() {
        handle.authenticate_password(&cfg.user, pw).await
    } else {
        return Err("no key or password is configured for this resource".into());
    };
    match auth {
        Ok(r) if r.success() => Ok((handle, seen_now)),
        Ok(_) => Err(format!(
            "the target refused the edge's credentials for user {}",
            cfg.user
        )),
        Err(e) => Err(format!("SSH authentication with {addr}: {e}")),
    }
}

/// Waits for the answer to a request sent with want_reply; data that comes
/// first is kept for the relay.
async fn answer(
    ch: &mut russh::Channel<russh::client::Msg>,
    early: &mut Vec<ChannelMsg>,
) -> Result<bool, String> {
    loop {
        match ch.wait().await {
            Some(ChannelMsg::Success) => return Ok(true),
            Some(ChannelMsg::Failure) => return Ok(false),
            Some(m @ (ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. })) => early.push(m),
            Some(ChannelMsg::Close) | None => return Err("the target closed the channel".into()),
            Some(_) => {}
        }
    }
}

async fn open_channel(
    handle: &russh::client::Handle<Client>,
    req: &t::SshChannel,
    early: &mut Vec<ChannelMsg>,
) -> Result<russh::Channel<russh::client::Msg>, String> {
    use t::ssh_channel::Kind;
    let kind = req.kind.clone().ok_or("no channel kind")?;
    if let Kind::Forward(f) = &kind {
        return handle
            .channel_open_direct_tcpip(
                f.host.clone(),
                f.port,
                f.originator_host.clone(),
                f.originator_port,
            )
            .await
            .map_err(|e| {
                format!(
                    "the target refused the forward to {}:{}: {e}",
                    f.host, f.port
                )
            });
    }
    let mut ch = handle
        .channel_open_session()
        .await
        .map_err(|e| format!("open a channel on the target: {e}"))?;
    for (k, v) in &req.env {
        // Refused variables (AcceptEnv) are not an error, as with OpenSSH.
        let _ = ch.set_env(false, k.clone(), v.clone()).await;
    }
    if let Some(pty) = &req.pty {
        let modes: Vec<(Pty, u32)> = wire::decode_modes(&pty.modes)
            .into_iter()
            .filter_map(|(op, v)| Some((Pty::from_u8(op)?, v)))
            .collect();
        ch.request_pty(
            true,
            &pty.term,
            pty.cols,
            pty.rows,
            pty.px_width,
            pty.px_height,
            &modes,
        )
        .await
        .map_err(|e| e.to_string())?;
        if !answer(&mut ch, early).await? {
            return Err("the target refused the terminal".into());
        }
    }
    let what = match &kind {
        Kind::Shell(_) => {
            ch.request_shell(true).await.map_err(|e| e.to_string())?;
            "the shell".to_string()
        }
        Kind::Exec(cmd) => {
            ch.exec(true, cmd.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            "the command".to_string()
        }
        Kind::Subsystem(name) => {
            ch.request_subsystem(true, name.clone())
                .await
                .map_err(|e| e.to_string())?;
            format!("the {name} subsystem")
        }
        Kind::Forward(_) => unreachable!("handled above"),
    };
    if !answer(&mut ch, early).await? {
        return Err(format!("the target refused {what}"));
    }
    Ok(ch)
}

/// The SSH name of a signal (russh keeps its own conversion private).
fn sig_name(s: &russh::Sig) -> String {
    use russh::Sig;
    match s {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
    .to_owned()
}

/// Runs one session to completion.
pub async fn run(
    cfg: &SshConfig,
    data_dir: &Path,
    open: &t::SessionOpen,
    req: t::SshChannel,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let session = open.session_id.as_str();
    let mut early = Vec::new();
    let connected = match connect(cfg, data_dir, &open.resource).await {
        Ok((handle, seen)) => match open_channel(&handle, &req, &mut early).await {
            Ok(ch) => Ok((handle, seen, ch)),
            Err(e) => {
                let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    let (handle, seen, ch) = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(session, error = %e, "ssh session failed to start");
            let _ = write_frame(&mut send, &frame(t::session_frame::Kind::Error(e))).await;
            let _ = send.finish();
            return;
        }
    };
    tracing::info!(session, resource = %open.resource, identity = %open.identity, host_key = %seen.fingerprint, learned = seen.learned, "ssh session started");
    let started = t::Started {
        host_key: seen.fingerprint.clone(),
        host_key_learned: seen.learned,
    };
    if write_frame(&mut send, &frame(t::session_frame::Kind::Started(started)))
        .await
        .is_err()
    {
        let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
        return;
    }

    let (mut rd, wr) = ch.split();
    let valve = Arc::new(Valve::new(SOFT_BOUND, HARD_BOUND));

    // Target output, taken off the connection within the valve's bounds.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<t::SessionFrame>();
    let take_valve = valve.clone();
    let reader = tokio::spawn(async move {
        let data = |c: t::Channel, b: bytes::Bytes| {
            frame(t::session_frame::Kind::Data(t::Data {
                channel: c as i32,
                data: b,
            }))
        };
        for m in early {
            match m {
                ChannelMsg::Data { data: b } => {
                    let _ = out_tx.send(data(t::Channel::Stdout, b));
                }
                ChannelMsg::ExtendedData { data: b, ext: 1 } => {
                    let _ = out_tx.send(data(t::Channel::Stderr, b));
                }
                _ => {}
            }
        }
        let mut exit = t::Exit {
            code: -1,
            signal: 0,
        };
        while let Some(m) = rd.wait().await {
            match m {
                ChannelMsg::Data { data: b } => {
                    take_valve.take(b.len() as u64).await;
                    let _ = out_tx.send(data(t::Channel::Stdout, b));
                }
                ChannelMsg::ExtendedData { data: b, ext: 1 } => {
                    take_valve.take(b.len() as u64).await;
                    let _ = out_tx.send(data(t::Channel::Stderr, b));
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    exit.code = exit_status as i32;
                }
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    exit.code = -1;
                    exit.signal = wire::signal_number(&sig_name(&signal_name));
                }
                ChannelMsg::Eof => {
                    let _ = out_tx.send(frame(t::session_frame::Kind::Eof(t::Eof {})));
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        // A channel closed without a status (a forward, a target that sent
        // none) keeps code -1: the client is told no status either.
        let _ = out_tx.send(frame(t::session_frame::Kind::Exit(exit)));
    });

    // Caller input and terminal changes, written through the connection.
    let (abort_tx, mut abort_rx) = tokio::sync::oneshot::channel::<String>();
    let write_valve = valve.clone();
    let input = tokio::spawn(async move {
        loop {
            match read_frame::<t::SessionFrame, _>(&mut recv).await {
                Ok(Some(t::SessionFrame { kind: Some(k) })) => match k {
                    t::session_frame::Kind::Data(d) if d.channel == t::Channel::Stdin as i32 => {
                        let _sending = write_valve.sending();
                        if wr.data_bytes(d.data).await.is_err() {
                            return;
                        }
                    }
                    t::session_frame::Kind::Eof(_) => {
                        let _ = wr.eof().await;
                    }
                    t::session_frame::Kind::SshResize(r) => {
                        let _sending = write_valve.sending();
                        let _ = wr
                            .window_change(r.cols, r.rows, r.px_width, r.px_height)
                            .await;
                    }
                    _ => {
                        let _ = abort_tx.send("unexpected frame from the coordinator".into());
                        return;
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    // The coordinator finished its side: keep the channel
                    // open for output, and wait for a reset.
                    let _ = wr.eof().await;
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = abort_tx.send(format!("session stream: {e}"));
                    return;
                }
            }
        }
    });

    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut input_done = false;
    let aborted: Option<String> = loop {
        tokio::select! {
            f = out_rx.recv() => match f {
                Some(f) => {
                    let n = match &f.kind {
                        Some(t::session_frame::Kind::Data(d)) => d.data.len() as u64,
                        _ => 0,
                    };
                    let last = matches!(f.kind, Some(t::session_frame::Kind::Exit(_)));
                    if let Err(e) = write_frame(&mut send, &f).await {
                        break Some(format!("write to the coordinator: {e}"));
                    }
                    valve.release(n);
                    if last {
                        break None;
                    }
                }
                None => break Some("the target's channel ended without a status".into()),
            },
            _ = &mut stopped => break Some("the coordinator abandoned the session".into()),
            r = &mut abort_rx, if !input_done => match r {
                Ok(why) => break Some(why),
                Err(_) => input_done = true,
            },
        }
    };
    input.abort();
    reader.abort();
    let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
    match aborted {
        Some(why) => {
            tracing::warn!(session, reason = %why, "ssh session aborted");
            let _ = send.reset(1u32.into());
        }
        None => {
            tracing::info!(session, "ssh session ended");
            let _ = send.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn known_hosts_lines_match_by_name_and_port() {
        let text = format!(
            "# comment\nother.example {ED}\n[127.0.0.1]:2222,db-1 {ED} a comment\n127.0.0.1 {ED}\n"
        );
        let n = |h: &str, p: u16| known_hosts_keys(&text, h, p).unwrap().keys.len();
        assert_eq!(n("127.0.0.1", 2222), 1);
        assert_eq!(n("127.0.0.1", 22), 1);
        assert_eq!(n("db-1", 22), 1);
        assert_eq!(n("nowhere", 22), 0);
        let negated = format!("!127.0.0.1,127.0.0.1 {ED}\n");
        assert!(known_hosts_keys(&negated, "127.0.0.1", 22)
            .unwrap()
            .is_empty());
        let cas = format!("@cert-authority *.example,[10.0.0.?]:2222 {ED}\n");
        let found = known_hosts_keys(&cas, "db.example", 22).unwrap();
        assert_eq!((found.keys.len(), found.cas.len()), (0, 1));
        assert_eq!(
            known_hosts_keys(&cas, "10.0.0.7", 2222).unwrap().cas.len(),
            1
        );
        assert!(known_hosts_keys(&cas, "example", 22).unwrap().is_empty());
    }

    #[test]
    fn host_certificates_must_be_of_a_pinned_authority_for_this_host_and_now() {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        use russh::keys::ssh_key::private::Ed25519Keypair;
        use russh::keys::PrivateKey;
        let key = |seed: u8| PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]));
        let (ca, other_ca, host_key) = (key(1), key(2), key(3));
        let cert = |signer: &PrivateKey, kind: CertType, principal: &str| {
            let mut b = Builder::new(
                [7u8; 16],
                host_key.public_key().key_data().clone(),
                1_000,
                2_000,
            )
            .unwrap();
            b.cert_type(kind).unwrap();
            b.valid_principal(principal).unwrap();
            b.key_id("host-1").unwrap();
            b.sign(signer).unwrap()
        };
        let cas = [ca.public_key().clone()];
        let good = cert(&ca, CertType::Host, "db.internal");
        assert_eq!(
            check_host_certificate(&good, &cas, "db.internal", 1_500),
            Ok(())
        );
        let e = check_host_certificate(&good, &cas, "other.internal", 1_500).unwrap_err();
        assert!(e.contains("not other.internal"), "{e}");
        let e = check_host_certificate(&good, &cas, "db.internal", 2_000).unwrap_err();
        assert!(e.contains("not valid now"), "{e}");
        let forged = cert(&other_ca, CertType::Host, "db.internal");
        let e = check_host_certificate(&forged, &cas, "db.internal", 1_500).unwrap_err();
        assert!(e.contains("not a pinned authority"), "{e}");
        let user = cert(&ca, CertType::User, "db.internal");
        let e = check_host_certificate(&user, &cas, "db.internal", 1_500).unwrap_err();
        assert!(e.contains("user certificate"), "{e}");
    }

    #[test]
    fn revoked_markers_and_hashed_names_are_refused_not_skipped() {
        let e = known_hosts_keys(&format!("@revoked *.example {ED}\n"), "h", 22).unwrap_err();
        assert!(e.contains("@revoked"), "{e}");
        let e = known_hosts_keys(&format!("|1|abc=|def= {ED}\n"), "h", 22).unwrap_err();
        assert!(e.contains("hashed"), "{e}");
        let e = known_hosts_keys("h ssh-ed25519 notbase64\n", "h", 22).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
