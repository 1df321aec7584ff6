//! One command on a shell resource (or an SSH host), the same for every front
//! door that runs one (`Sessions.Exec`, the MCP `exec` tool): open the
//! session the gateway cleared with the command as its first event, send the
//! command (an SSH exec channel, for an SSH host, whose start is awaited and
//! its host key recorded), and hand back the byte session for
//! [`super::relay::run`].

use std::net::SocketAddr;
use std::sync::Arc;

use custody_proto::evidence::v1 as ev;
use custody_proto::tunnel::v1 as t;

use super::authorize::Cleared;
use super::{relay, GatewayError};
use crate::evidence::DEFAULT_OUTPUT_CAP;
use crate::storage::Engine;
use crate::tunnel::session::frame;
use crate::tunnel::Tunnels;

/// Where the command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A shell resource: argv, no shell.
    Shell,
    /// An SSH host: the command line, run by the login's shell there.
    Ssh,
}

/// How long an SSH host may take to start the channel.
const SSH_START: std::time::Duration = std::time::Duration::from_secs(30);

/// What the front door asks to run.
pub struct ExecStart {
    pub target: Target,
    pub argv: Vec<String>,
    /// The command line as judged (see `api::sessions::shell_join`).
    pub command: String,
    pub token_expires_at: u64,
    pub client_addr: Option<SocketAddr>,
    pub via: &'static str,
    /// Recorded before the command (an MCP tool call).
    pub first_events: Vec<ev::event::Kind>,
}

/// A command sent to the edge: relay its session.
pub struct Started {
    pub session_id: String,
    pub edge: String,
    pub via_node: u64,
    pub strict: bool,
    pub session: relay::ByteSession,
}

/// Opens the session and sends the command; nothing runs before its
/// evidence is recorded (committed, in strict mode).
pub async fn start<E: Engine>(
    tunnels: &Tunnels<E>,
    cleared: Cleared,
    how: ExecStart,
) -> Result<Started, GatewayError> {
    let recording = relay::Recording {
        masker: relay::masked_by(cleared.output_masker()),
        ..relay::Recording::bytes()
    };
    let mut first_events = how.first_events;
    match how.target {
        Target::Shell => first_events.push(ev::event::Kind::Command(ev::CommandEvent {
            text: how.command.clone(),
            argv: how.argv.clone(),
            params: vec![],
            verb: "exec".into(),
        })),
        Target::Ssh => {
            first_events.push(ev::event::Kind::SshChannel(ev::SshChannel {
                channel: "exec".into(),
                ..Default::default()
            }));
            first_events.push(ev::event::Kind::Command(ev::CommandEvent {
                text: how.command.clone(),
                argv: vec![],
                params: vec![],
                verb: "ssh:exec".into(),
            }));
        }
    }
    // Opening the stream runs nothing yet: the edge waits for the command.
    let opened = super::open::open(
        tunnels,
        cleared,
        super::open::Opening {
            token_expires_at: how.token_expires_at,
            client_addr: how.client_addr,
            via: how.via,
            command: how.command.clone(),
            judged_command: Some(how.command.clone()),
            first_events,
        },
    )
    .await?;
    let grant_until = opened.grant_until();
    let super::open::Opened {
        session_id,
        routed,
        rec,
        live,
        mode,
        ..
    } = opened;
    let rec = Arc::new(rec);
    let mut channel = routed.channel;
    let first = match how.target {
        Target::Shell => t::session_frame::Kind::Exec(t::ExecCommand { argv: how.argv }),
        Target::Ssh => t::session_frame::Kind::SshChannel(t::SshChannel {
            kind: Some(t::ssh_channel::Kind::Exec(how.command)),
            pty: None,
            env: Default::default(),
        }),
    };
    if channel.tx.send(frame(first)).await.is_err() {
        relay::abandon(&rec, "the edge stream closed before the command").await;
        return Err(GatewayError::Unavailable(
            "the edge stream closed before the command".into(),
        ));
    }
    if how.target == Target::Ssh {
        // The host's answer: started (with its key), or why not.
        let why = match tokio::time::timeout(SSH_START, channel.rx.recv()).await {
            Ok(Some(t::SessionFrame {
                kind: Some(t::session_frame::Kind::Started(s)),
            })) => {
                let key = ev::TargetKey {
                    fingerprint: s.host_key,
                    learned: s.host_key_learned,
                };
                match rec.record(ev::event::Kind::TargetKey(key)).await {
                    Ok(()) => None,
                    Err(e) => Some(e.to_string()),
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
                Some(e)
            }
            Ok(_) => Some("the edge did not start the channel".into()),
            Err(_) => Some("the edge did not start the channel in time".into()),
        };
        if let Some(why) = why {
            relay::abandon(&rec, &why).await;
            return Err(GatewayError::Unavailable(why));
        }
    }
    Ok(Started {
        session_id,
        edge: routed.edge.name.clone(),
        via_node: routed.via_node,
        strict: mode == super::EvidenceMode::Strict,
        session: relay::ByteSession {
            rec,
            live,
            channel,
            grant_until,
            output_cap: DEFAULT_OUTPUT_CAP,
            recording,
        },
    })
}
