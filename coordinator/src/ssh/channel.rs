//! One SSH channel, one Custody session. The channel's requests are read
//! until one starts something (`shell`, `exec`, the `sftp` subsystem); that
//! start is judged through the gateway (an exec's command by the guardrails,
//! held for approval when they ask), the session opens on the edge (committed
//! first in strict mode), the target's answer (and its host key) is
//! recorded, and then bytes are relayed by [`crate::gateway::relay`] until
//! the target exits or anything ends the session. The exit status or
//! signal, EOF and close go back to the client in that order.
//!
//! Nothing here blocks russh's connection loop on the edge: input taken off
//! the connection is bounded by a [`Valve`] that yields while output waits
//! to be written through the same loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure, Sig};
use tokio::sync::mpsc;

use custody_proto::evidence::v1 as ev;
use custody_proto::flow::Valve;
use custody_proto::tunnel::v1 as t;

use super::taps::{ScpTap, SftpTap, TrafficTap};
use super::Conn;
use crate::api::sessions::KEYSTROKES;
use crate::consensus::node::now_ms;
use crate::gateway::authorize::{authorize, Ask, Cleared, Verdict};
use crate::gateway::relay::{self, ByteSession, Finish, Input, Output, Recording};
use crate::gateway::{Action, EvidenceMode, Guard, Kind, FILE_CONTENTS_LABEL};
use crate::storage::Engine;
use crate::tunnel::session::frame;
use crate::tunnel::Tunnels;

/// Input taken off the client's connection and not yet sent to the edge.
const SOFT_BOUND: u64 = 4 << 20;
const HARD_BOUND: u64 = 256 << 20;
/// How long the edge may take to reach the target and start the channel.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Output recorded per session.
const OUTPUT_CAP: u64 = 64 << 20;
const MAX_ENV: usize = 64;
const MAX_COMMAND: usize = 64 << 10;
/// Input kept while a command waits for its approval.
const HELD_INPUT: usize = 1 << 20;

pub(super) struct Context<E: Engine> {
    pub tunnels: Arc<Tunnels<E>>,
    pub guard: Arc<Guard>,
    pub notifier: crate::notify::Notifier,
    pub conn: Arc<Conn>,
}

/// What the channel asked to start.
#[derive(Debug, Clone)]
pub(super) enum Start {
    Shell,
    Exec(String),
    Sftp,
    /// A `direct-tcpip` channel (`ssh -L`, `-W`).
    Forward(t::SshForward),
}

impl Start {
    fn action(&self) -> Action {
        match self {
            Start::Shell => Action::Shell,
            Start::Exec(_) => Action::Exec,
            Start::Sftp => Action::Sftp,
            Start::Forward(_) => Action::PortForward,
        }
    }

    /// The command text policy and evidence see (a forward's destination).
    fn text(&self) -> String {
        match self {
            Start::Shell => "shell".into(),
            Start::Exec(c) => c.clone(),
            Start::Sftp => "sftp".into(),
            Start::Forward(f) => format!("{}:{}", f.host, f.port),
        }
    }

    fn channel(&self) -> &'static str {
        match self {
            Start::Shell => "shell",
            Start::Exec(_) => "exec",
            Start::Sftp => "sftp",
            Start::Forward(_) => "port-forward",
        }
    }

    /// What the evidence keeps of the channel's bytes: a terminal's
    /// keystrokes on strict resources only; SFTP and scp as file
    /// operations (their contents too when the resource says so); a
    /// forward as byte counts; exec output masked by the rule's profiles.
    fn recording(&self, c: &Cleared, strict: bool) -> Recording {
        let contents = c
            .resource()
            .labels
            .get(FILE_CONTENTS_LABEL)
            .map(String::as_str)
            == Some("true");
        let files = |tap: Box<dyn relay::Tap>| Recording {
            input: contents.then_some("stdin"),
            output: contents.then_some("stdout"),
            tap: Some(tap),
            masker: None,
        };
        match self {
            Start::Shell => Recording {
                input: strict.then_some(KEYSTROKES),
                output: Some("stdout"),
                tap: None,
                masker: None,
            },
            Start::Exec(cmd) => match ScpTap::for_command(cmd) {
                Some(tap) => Recording {
                    masker: relay::masked_by(c.output_masker()),
                    ..files(Box::new(tap))
                },
                None => Recording {
                    masker: relay::masked_by(c.output_masker()),
                    ..Recording::bytes()
                },
            },
            Start::Sftp => files(Box::<SftpTap>::default()),
            Start::Forward(_) => Recording {
                input: None,
                output: None,
                tap: Some(Box::new(TrafficTap {
                    destination: self.text(),
                    to_target: 0,
                    from_target: 0,
                })),
                masker: None,
            },
        }
    }
}

/// The requests that came before the start.
#[derive(Default)]
struct Setup {
    pty: Option<t::SshPty>,
    env: BTreeMap<String, String>,
}

/// Writes a line of the gateway's own to the client's stderr.
async fn say(handle: &Handle, id: ChannelId, msg: &str) {
    let _ = handle
        .extended_data(id, 1, Bytes::from(format!("custody: {msg}\r\n")))
        .await;
}

/// Ends the channel with an exit status, as a refused or failed start does.
async fn finish_with(handle: &Handle, id: ChannelId, code: u32) {
    let _ = handle.exit_status_request(id, code).await;
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

pub(super) async fn drive<E: Engine>(ctx: Context<E>, mut ch: Channel<Msg>, handle: Handle) {
    let id = ch.id();
    let mut setup = Setup::default();
    let start = loop {
        let Some(m) = ch.wait().await else { return };
        match m {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                let modes: Vec<(u8, u32)> = terminal_modes
                    .iter()
                    .map(|(op, v)| (*op as u8, *v))
                    .collect();
                setup.pty = Some(t::SshPty {
                    term,
                    cols: col_width,
                    rows: row_height,
                    px_width: pix_width,
                    px_height: pix_height,
                    modes: custody_proto::ssh::encode_modes(&modes).into(),
                });
                let _ = handle.channel_success(id).await;
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                if setup.env.len() < MAX_ENV && variable_name.len() + variable_value.len() <= 4096 {
                    setup.env.insert(variable_name, variable_value);
                    let _ = handle.channel_success(id).await;
                } else {
                    let _ = handle.channel_failure(id).await;
                }
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(p) = setup.pty.as_mut() {
                    (p.cols, p.rows, p.px_width, p.px_height) =
                        (col_width, row_height, pix_width, pix_height);
                }
            }
            ChannelMsg::AgentForward { .. } => {
                // russh answers the request with a failure.
                say(&handle, id, "agent forwarding is refused by the gateway").await;
            }
            ChannelMsg::RequestX11 { .. } => {
                say(&handle, id, "X11 forwarding is refused by the gateway").await;
                let _ = handle.channel_failure(id).await;
            }
            ChannelMsg::RequestShell { .. } => break Start::Shell,
            ChannelMsg::Exec { command, .. } => {
                if command.len() > MAX_COMMAND {
                    say(&handle, id, "the command is too long").await;
                    let _ = handle.channel_failure(id).await;
                    continue;
                }
                break Start::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" => break Start::Sftp,
            ChannelMsg::RequestSubsystem { name, .. } => {
                say(&handle, id, &format!("the {name} subsystem is not offered")).await;
                let _ = handle.channel_failure(id).await;
            }
            ChannelMsg::Eof | ChannelMsg::Close => return,
            _ => {}
        }
    };
    if let Err(msg) = run(&ctx, ch, &handle, setup, start, &mut None).await {
        // The request is answered as started, so that the client shows the
        // reason (OpenSSH drops a channel's stderr once a shell request
        // fails) and exits with status 1.
        let _ = handle.channel_success(id).await;
        say(&handle, id, &msg).await;
        finish_with(&handle, id, 1).await;
    }
}

/// A `direct-tcpip` channel: opened (accepted) only once policy allows the
/// destination and the edge reached it; refused with the reason otherwise.
pub(super) async fn forward<E: Engine>(
    ctx: Context<E>,
    ch: Channel<Msg>,
    handle: Handle,
    reply: ChannelOpenHandle,
    dest: t::SshForward,
) {
    let conn = ctx.conn.clone();
    let mut reply = Some(reply);
    let start = Start::Forward(dest);
    let text = start.text();
    if let Err(msg) = run(&ctx, ch, &handle, Setup::default(), start, &mut reply).await {
        tracing::warn!(target: "audit", event = "ssh_forward_refused", connection = %conn.connection_id, subject = %conn.identity.subject, destination = %text, reason = %msg);
        if let Some(r) = reply.take() {
            r.reject(ChannelOpenFailure::Other {
                code: 1,
                reason: format!("custody: {msg}"),
            })
            .await;
        }
    }
}

/// Judges the start, waiting for an approval when policy holds it.
async fn clear<E: Engine>(
    ctx: &Context<E>,
    handle: &Handle,
    id: ChannelId,
    start: &Start,
    wait: &mut Channel<Msg>,
    early: &mut Vec<Input>,
) -> Result<crate::gateway::authorize::Cleared, String> {
    let node = &ctx.tunnels.node;
    let conn = &ctx.conn;
    let text = start.text();
    let mut request_id = 0;
    loop {
        let verdict = authorize(
            node,
            &ctx.guard,
            Ask {
                identity: &conn.identity,
                resource: &conn.resource,
                kind: Kind::Ssh,
                action: start.action(),
                command: Some(&text),
                request_id,
                approved_as: None,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let (c, doc) = match verdict {
            Verdict::Cleared(c) => return unmaskable(start, c),
            Verdict::NeedsApproval(c, doc) => (c, doc),
        };
        if request_id != 0 {
            return Err(format!(
                "approval request {request_id} does not cover this command"
            ));
        }
        if !matches!(start, Start::Exec(_)) {
            let name = &c.resource().name;
            return Err(format!(
                "policy rule {} requires approval for {} on {name}: run `custody access request {name} --for 1h --reason ...`",
                c.decision().by.label(),
                start.action()
            ));
        }
        request_id = hold(ctx, handle, id, &text, &c, &doc, wait, early).await?;
    }
}

/// Output masking applies to commands' output, which is read line by line;
/// a terminal, a file transfer or a forward under a rule that masks would
/// pass what the rule hides, so they are refused.
fn unmaskable(start: &Start, c: Cleared) -> Result<Cleared, String> {
    if matches!(start, Start::Exec(_)) || c.output_masker().is_none() {
        return Ok(c);
    }
    Err(format!(
        "policy rule {} masks output on {}, which a {} channel cannot honour; run commands instead (ssh HOST -- CMD)",
        c.decision().by.label(),
        c.resource().name,
        start.channel()
    ))
}

/// Finds or creates the approval request for this exact command, tells the
/// client and waits for the decision, watching the channel: a client that
/// goes away abandons the command (the request stays for a retry). Input
/// sent meanwhile is kept for the command, up to [`HELD_INPUT`].
#[allow(clippy::too_many_arguments)]
async fn hold<E: Engine>(
    ctx: &Context<E>,
    handle: &Handle,
    id: ChannelId,
    command: &str,
    c: &crate::gateway::authorize::Cleared,
    doc: &crate::policy::ApprovalDoc,
    wait: &mut Channel<Msg>,
    early: &mut Vec<Input>,
) -> Result<u64, String> {
    use crate::state::approvals::{self, approval_get, effective_status};
    let node = &ctx.tunnels.node;
    let request = crate::gateway::session::command_request(
        node,
        &ctx.notifier,
        crate::gateway::session::HeldCommand {
            identity: &ctx.conn.identity,
            resource: &ctx.conn.resource,
            action: Action::Exec,
            shown: command.to_owned(),
            digest: crate::gateway::session::command_digest(command),
            rule: c.decision().by.label(),
            doc,
            via: "ssh",
            justification: String::new(),
        },
    )
    .await?;
    say(
        handle,
        id,
        &format!(
            "approval required: request {request} ({}); waiting for a decision (custody approvals approve {request})",
            c.decision().reason
        ),
    )
    .await;
    loop {
        if let Ok(Some(r)) = approval_get(node.store(), request) {
            approvals::covers(&r, Action::Exec)?;
            match effective_status(&r, now_ms()) {
                approvals::PENDING => {}
                approvals::APPROVED => return Ok(request),
                other => {
                    return Err(format!(
                        "approval request {request} is {other}; the command was not run"
                    ))
                }
            }
        }
        let held: usize = early
            .iter()
            .map(|i| match i {
                Input::Stdin(b) => b.len(),
                _ => 0,
            })
            .sum();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            m = wait.wait(), if held < HELD_INPUT => match m {
                None | Some(ChannelMsg::Close) => return Err(format!(
                    "the client went away while the command was held (request {request}); it was not run"
                )),
                Some(ChannelMsg::Data { data }) => early.push(Input::Stdin(data)),
                Some(ChannelMsg::Eof) => early.push(Input::Eof),
                _ => {}
            },
        }
    }
}

/// Runs one channel's session. A forward's channel is accepted through
/// `reply` once the edge reached its destination; on an error before
/// that, `reply` is left for the caller to refuse.
async fn run<E: Engine>(
    ctx: &Context<E>,
    mut ch: Channel<Msg>,
    handle: &Handle,
    setup: Setup,
    start: Start,
    reply: &mut Option<ChannelOpenHandle>,
) -> Result<(), String> {
    let id = ch.id();
    let conn = &ctx.conn;
    let mut early = Vec::new();
    let cleared = clear(ctx, handle, id, &start, &mut ch, &mut early).await?;
    let strict = EvidenceMode::of(&cleared.resource().labels) == EvidenceMode::Strict;
    let recording = start.recording(&cleared, strict);
    let text = start.text();
    let kind = match &start {
        Start::Shell => t::ssh_channel::Kind::Shell(t::SshShell {}),
        Start::Exec(c) => t::ssh_channel::Kind::Exec(c.clone()),
        Start::Sftp => t::ssh_channel::Kind::Subsystem("sftp".into()),
        Start::Forward(f) => t::ssh_channel::Kind::Forward(f.clone()),
    };
    let channel_event = ev::SshChannel {
        connection_id: conn.connection_id.clone(),
        login: conn.login.clone(),
        channel: start.channel().into(),
        term: setup
            .pty
            .as_ref()
            .map(|p| p.term.clone())
            .unwrap_or_default(),
        cols: setup.pty.as_ref().map_or(0, |p| p.cols),
        rows: setup.pty.as_ref().map_or(0, |p| p.rows),
        env: setup.env.clone().into_iter().collect(),
    };
    let cmd_event = ev::CommandEvent {
        text: text.clone(),
        argv: vec![],
        params: vec![],
        verb: format!("ssh:{}", start.action()),
    };
    let opened = crate::gateway::open::open(
        &ctx.tunnels,
        cleared,
        crate::gateway::open::Opening {
            token_expires_at: conn.token_expires_at,
            client_addr: Some(conn.peer),
            via: "ssh",
            command: text.clone(),
            judged_command: Some(text.clone()),
            first_events: vec![
                ev::event::Kind::SshChannel(channel_event),
                ev::event::Kind::Command(cmd_event),
            ],
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let grant_until = opened.grant_until();
    let crate::gateway::open::Opened {
        session_id,
        routed,
        rec,
        live,
        mode,
        ..
    } = opened;
    let rec = Arc::new(rec);
    let mut channel = routed.channel;
    let request = t::SshChannel {
        kind: Some(kind),
        pty: setup.pty.clone(),
        env: setup.env.clone().into_iter().collect(),
    };
    if channel
        .tx
        .send(frame(t::session_frame::Kind::SshChannel(request)))
        .await
        .is_err()
    {
        relay::abandon(&rec, "the edge stream closed before the channel opened").await;
        return Err("the edge stream closed before the channel opened".into());
    }
    // The target's answer: started (with its host key), or why not.
    let first = tokio::time::timeout(START_TIMEOUT, channel.rx.recv()).await;
    match first {
        Ok(Some(t::SessionFrame {
            kind: Some(t::session_frame::Kind::Started(s)),
        })) => {
            let key = ev::TargetKey {
                fingerprint: s.host_key,
                learned: s.host_key_learned,
            };
            if let Err(e) = rec.record(ev::event::Kind::TargetKey(key)).await {
                relay::abandon(&rec, &e.to_string()).await;
                return Err(e.to_string());
            }
        }
        Ok(Some(t::SessionFrame {
            kind: Some(t::session_frame::Kind::Error(e)),
        })) => {
            let outcome = ev::Outcome {
                exit_code: -1,
                error: e.clone(),
                ..Default::default()
            };
            let _ = rec.record(ev::event::Kind::Outcome(outcome)).await;
            relay::abandon(&rec, &e).await;
            return Err(e);
        }
        Ok(_) => {
            relay::abandon(&rec, "the edge did not start the channel").await;
            return Err("the edge did not start the channel".into());
        }
        Err(_) => {
            relay::abandon(&rec, "the edge did not start the channel in time").await;
            return Err("the edge did not start the channel in time".into());
        }
    }
    match reply.take() {
        Some(r) => r.accept().await,
        None => {
            let _ = handle.channel_success(id).await;
        }
    }
    tracing::info!(
        target: "audit",
        event = "session_opened",
        session = %session_id,
        connection = %conn.connection_id,
        subject = %conn.identity.subject,
        resource = %conn.resource,
        edge = %routed.edge.name,
        via_node = routed.via_node,
        action = %start.action(),
        command_bytes = text.len(),
        strict = mode == EvidenceMode::Strict,
    );

    let (mut rd, wr) = ch.split();
    let valve = Arc::new(Valve::new(SOFT_BOUND, HARD_BOUND));
    // Client input: taken off the connection within the valve's bounds,
    // then handed to the relay, which records it and sends it on.
    let (in_tx, in_rx) = mpsc::channel(crate::tunnel::session::CHANNEL_FRAMES);
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<Input>();
    for i in early {
        let _ = queue_tx.send(i);
    }
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let take_valve = valve.clone();
    let reader = tokio::spawn(async move {
        let mut gone_tx = Some(gone_tx);
        loop {
            let i = match rd.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    take_valve.take(data.len() as u64).await;
                    Input::Stdin(data)
                }
                Some(ChannelMsg::Eof) => Input::Eof,
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                }) => Input::Resize {
                    cols: col_width,
                    rows: row_height,
                    px_width: pix_width,
                    px_height: pix_height,
                },
                Some(ChannelMsg::Close) | None => {
                    if let Some(g) = gone_tx.take() {
                        let _ = g.send(());
                    }
                    return;
                }
                Some(_) => continue,
            };
            if queue_tx.send(i).is_err() {
                return;
            }
        }
    });
    let release_valve = valve.clone();
    let forwarder = tokio::spawn(async move {
        while let Some(i) = queue_rx.recv().await {
            let n = match &i {
                Input::Stdin(b) => b.len() as u64,
                _ => 0,
            };
            if in_tx.send(i).await.is_err() {
                return;
            }
            release_valve.release(n);
        }
    });

    // Target output, written to the client through the connection; the
    // client closing the channel ends the session.
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(crate::tunnel::session::CHANNEL_FRAMES);
    let write_valve = valve.clone();
    let writer = tokio::spawn(async move {
        let mut gone_rx = gone_rx;
        loop {
            let o = tokio::select! {
                o = out_rx.recv() => match o {
                    Some(o) => o,
                    None => return wr,
                },
                _ = &mut gone_rx => return wr,
            };
            let _sending = write_valve.sending();
            let sent = match o {
                Output::Stdout(b) => wr.data_bytes(b).await,
                Output::Stderr(b) => wr.extended_data_bytes(1, b).await,
            };
            if sent.is_err() {
                return wr;
            }
        }
    });
    let session = ByteSession {
        rec,
        live,
        channel,
        grant_until,
        output_cap: OUTPUT_CAP,
        recording,
    };
    let finish = relay::run(session, in_rx, out_tx, |o| o).await;
    // All output is written before the status.
    let wr = writer.await.ok();
    reader.abort();
    forwarder.abort();
    match &finish {
        Finish::Exited { code, signal } => {
            if let Some(name) =
                custody_proto::ssh::signal_by_number(*signal).filter(|_| *signal > 0)
            {
                let _ = handle
                    .exit_signal_request(id, sig(name), false, String::new(), String::new())
                    .await;
            } else if let Ok(code) = u32::try_from(*code) {
                let _ = handle.exit_status_request(id, code).await;
            }
        }
        Finish::CallerGone => {}
        Finish::Aborted(msg) | Finish::Unrecorded(msg) => {
            say(handle, id, &format!("the session ended: {msg}")).await;
            let _ = handle.exit_status_request(id, 255).await;
        }
    }
    if let Some(wr) = wr {
        let _ = wr.eof().await;
        let _ = wr.close().await;
    } else {
        let _ = handle.eof(id).await;
        let _ = handle.close(id).await;
    }
    tracing::info!(target: "audit", event = "session_closed", session = %session_id, finish = ?finish);
    Ok(())
}

fn sig(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_owned()),
    }
}
