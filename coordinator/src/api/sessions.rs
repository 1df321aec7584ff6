//! `custody.v1.Sessions`: commands on resources behind edges.
//!
//! Order of checks, all before anything reaches an edge: the caller's token,
//! the resource (it must exist in replicated state), then the policy decision
//! for action `exec` with the command line (guardrails included), read after a
//! ReadIndex so a policy change committed anywhere is already in force.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use custody_proto::tunnel::v1 as t;
use custody_proto::v1 as api;
use custody_proto::v1::sessions_server::Sessions;

use super::{storage_status, Guard};
use crate::policy::{Effect, Request as PolicyRequest, ResourceInfo};
use crate::state::edges;
use crate::storage::Engine;
use crate::tunnel::session::frame;
use crate::tunnel::Tunnels;

/// The first message (`start`) must arrive within this time.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ARGV_BYTES: usize = 64 << 10;

pub struct SessionsService<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
}

impl<E: Engine> SessionsService<E> {
    pub fn new(tunnels: Arc<Tunnels<E>>, guard: Arc<Guard>) -> Self {
        Self { tunnels, guard }
    }
}

/// Joins argv into one command line, quoting words the shell would split, so
/// guardrails and auditors see what the caller asked for.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn new_session_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type ExecStream = Pin<Box<dyn Stream<Item = Result<api::ExecOutput, Status>> + Send>>;

fn out(kind: api::exec_output::Kind) -> Result<api::ExecOutput, Status> {
    Ok(api::ExecOutput { kind: Some(kind) })
}

#[tonic::async_trait]
impl<E: Engine> Sessions for SessionsService<E> {
    type ExecStream = ExecStream;

    async fn exec(
        &self,
        req: Request<Streaming<api::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let node = &self.tunnels.node;
        let id = self.guard.authenticate(node, &req, "sessions.exec").await?;
        let client_addr = req.remote_addr();
        let mut input = req.into_inner();
        let start = match tokio::time::timeout(START_TIMEOUT, input.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no start message")),
            Ok(r) => match r?.and_then(|m| m.kind) {
                Some(api::exec_input::Kind::Start(s)) => s,
                _ => return Err(Status::invalid_argument("the first message must be start")),
            },
        };
        if start.argv.is_empty() || start.argv[0].is_empty() {
            return Err(Status::invalid_argument("a command is required"));
        }
        if start.argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
            return Err(Status::invalid_argument(format!(
                "command line is longer than {MAX_ARGV_BYTES} bytes"
            )));
        }
        let policy = self.guard.policy(node).await?;
        let serving =
            edges::edges_serving(node.store(), &start.resource).map_err(storage_status)?;
        let Some(def) = serving.first().map(|(_, d)| d.clone()) else {
            return Err(Status::not_found(format!(
                "no resource named {:?} (see `custody resources`)",
                start.resource
            )));
        };
        let resource = ResourceInfo {
            name: def.name.clone(),
            kind: def.kind.clone(),
            labels: def.labels.clone(),
        };
        if def.kind != "shell" {
            return Err(Status::failed_precondition(format!(
                "resource {} is a {} resource; exec needs a shell resource",
                def.name, def.kind
            )));
        }
        let command = shell_join(&start.argv);
        let d = policy.evaluate(&PolicyRequest {
            identity: &id,
            resource: &resource,
            action: "exec",
            command: Some(&command),
        });
        let rule = d.rule.clone().unwrap_or_else(|| "default-deny".into());
        match d.effect {
            Effect::Allow => {}
            Effect::Deny => {
                tracing::warn!(target: "audit", event = "session_denied", subject = %id.subject, issuer = %id.issuer, resource = %def.name, %rule, %command);
                return Err(Status::permission_denied(match &d.rule {
                    Some(r) => format!("denied by policy rule {r}: {}", d.reason),
                    None => format!("denied by policy (default deny): {}", d.reason),
                }));
            }
            Effect::RequireApproval => {
                tracing::warn!(target: "audit", event = "session_needs_approval", subject = %id.subject, resource = %def.name, %rule, %command);
                return Err(Status::failed_precondition(format!(
                    "approval required by policy rule {rule}: {} (approval requests are not available in this version)",
                    d.reason
                )));
            }
        }
        let session_id = new_session_id();
        let candidates: Vec<_> = serving.into_iter().map(|(e, _)| e).collect();
        let open = t::SessionOpen {
            session_id: session_id.clone(),
            resource: def.name.clone(),
            argv: start.argv.clone(),
            identity: format!("{} {}", id.issuer, id.subject),
        };
        let routed = self
            .tunnels
            .open_session(&def.name, &candidates, open)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(
            target: "audit",
            event = "session_opened",
            session = %session_id,
            subject = %id.subject,
            issuer = %id.issuer,
            client_kind = id.client_kind.as_str(),
            client = ?client_addr,
            resource = %def.name,
            edge = %routed.edge.name,
            via_node = routed.via_node,
            %rule,
            %command,
        );
        let crate::tunnel::SessionChannel { tx, mut rx } = routed.channel;

        // Caller input to the edge.
        tokio::spawn(async move {
            loop {
                let m = match input.message().await {
                    Ok(Some(m)) => m,
                    // Caller finished sending, or went away: either way no more input.
                    Ok(None) | Err(_) => return,
                };
                let f = match m.kind {
                    Some(api::exec_input::Kind::Stdin(b)) => {
                        frame(t::session_frame::Kind::Data(t::Data {
                            channel: t::Channel::Stdin as i32,
                            data: b,
                        }))
                    }
                    Some(api::exec_input::Kind::StdinEof(_)) => {
                        frame(t::session_frame::Kind::Eof(t::Eof {}))
                    }
                    _ => return,
                };
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        });

        let (out_tx, out_rx) = mpsc::channel(crate::tunnel::session::CHANNEL_FRAMES);
        let started = api::ExecStarted {
            session_id: session_id.clone(),
            edge: routed.edge.name.clone(),
            via_node: routed.via_node,
        };
        tokio::spawn(async move {
            let _ = out_tx
                .send(out(api::exec_output::Kind::Started(started)))
                .await;
            let mut ended = None;
            loop {
                // A silent command must still end when its caller goes away.
                let f = tokio::select! {
                    f = rx.recv() => match f {
                        Some(f) => f,
                        None => break,
                    },
                    _ = out_tx.closed() => {
                        ended = Some("caller disconnected".into());
                        break;
                    }
                };
                let msg = match f.kind {
                    Some(t::session_frame::Kind::Started(_)) => continue,
                    Some(t::session_frame::Kind::Data(d)) => {
                        match t::Channel::try_from(d.channel) {
                            Ok(t::Channel::Stdout) => out(api::exec_output::Kind::Stdout(d.data)),
                            Ok(t::Channel::Stderr) => out(api::exec_output::Kind::Stderr(d.data)),
                            _ => continue,
                        }
                    }
                    Some(t::session_frame::Kind::Exit(x)) => {
                        ended = Some(format!("exit {} signal {}", x.code, x.signal));
                        let _ = out_tx
                            .send(out(api::exec_output::Kind::Exit(api::ExecExit {
                                code: x.code,
                                signal: x.signal,
                            })))
                            .await;
                        break;
                    }
                    Some(t::session_frame::Kind::Error(e)) => {
                        ended = Some(format!("error: {e}"));
                        let _ = out_tx.send(Err(Status::aborted(e))).await;
                        break;
                    }
                    _ => continue,
                };
                if out_tx.send(msg).await.is_err() {
                    ended = Some("caller disconnected".into());
                    break;
                }
            }
            let reason = match ended {
                Some(r) => r,
                None => {
                    let _ = out_tx
                        .send(Err(Status::unavailable(
                            "the tunnel to the edge was lost; the command's outcome is unknown",
                        )))
                        .await;
                    "tunnel lost".into()
                }
            };
            tracing::info!(target: "audit", event = "session_closed", session = %session_id, %reason);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_join;

    #[test]
    fn joins_with_shell_quoting() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(shell_join(&v(&["ls", "-la", "/tmp"])), "ls -la /tmp");
        assert_eq!(
            shell_join(&v(&["sh", "-c", "echo hi; exit 3"])),
            "sh -c 'echo hi; exit 3'"
        );
        assert_eq!(shell_join(&v(&["echo", "it's", ""])), r"echo 'it'\''s' ''");
    }
}
