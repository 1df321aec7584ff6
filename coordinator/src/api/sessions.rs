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

use custody_proto::v1 as api;
use custody_proto::v1::sessions_server::Sessions;

use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;

use super::{storage_status, Guard};
use crate::gateway::session::{command_digest, create_request};
use crate::gateway::{relay, Action, Kind};
use crate::notify::Notifier;
use crate::policy::Role;
use crate::storage::Engine;
use crate::tunnel::Tunnels;
use custody_proto::export::hex;

/// The first message (`start`) must arrive within this time.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ARGV_BYTES: usize = 64 << 10;

pub struct SessionsService<E: Engine> {
    tunnels: Arc<Tunnels<E>>,
    guard: Arc<Guard>,
    notifier: Notifier,
}

impl<E: Engine> SessionsService<E> {
    pub fn new(tunnels: Arc<Tunnels<E>>, guard: Arc<Guard>, notifier: Notifier) -> Self {
        Self {
            tunnels,
            guard,
            notifier,
        }
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

type ExecStream = Pin<Box<dyn Stream<Item = Result<api::ExecOutput, Status>> + Send>>;

fn out(kind: api::exec_output::Kind) -> Result<api::ExecOutput, Status> {
    Ok(api::ExecOutput { kind: Some(kind) })
}

#[tonic::async_trait]
impl<E: Engine> Sessions for SessionsService<E> {
    type ExecStream = ExecStream;

    async fn list(
        &self,
        req: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        self.list_sessions(req).await
    }

    async fn get(
        &self,
        req: Request<api::GetSessionRequest>,
    ) -> Result<Response<api::GetSessionResponse>, Status> {
        self.get_session(req).await
    }

    async fn list_live(
        &self,
        req: Request<api::ListLiveSessionsRequest>,
    ) -> Result<Response<api::ListLiveSessionsResponse>, Status> {
        let t = &self.tunnels;
        let id = self
            .guard
            .authenticate(&t.node, &req, "sessions.list_live")
            .await?;
        let all = self.reads_all(&id).await?;
        let principal = id.principal();
        let mut out = api::ListLiveSessionsResponse::default();
        let here = t.node.id();
        let mut add = |node_id: u64, p: custody_proto::cluster::v1::PeerLiveSession| {
            if all || p.principal == principal {
                out.sessions.push(api::LiveSessionInfo {
                    session_id: p.session_id,
                    principal: p.principal,
                    identity: p.identity,
                    resource: p.resource,
                    via: p.via,
                    node_id,
                    opened_at_ms: p.opened_at_ms,
                    command: p.command,
                });
            }
        };
        for s in t.live.list() {
            add(here, crate::tunnel::peer::peer_live(&s));
        }
        let members = crate::state::load_members(t.node.store()).map_err(storage_status)?;
        let others: Vec<_> = members.into_iter().filter(|m| m.id != here).collect();
        let answers = futures::future::join_all(
            others
                .iter()
                .map(|m| async move { (m.id, t.peers.live_sessions(m).await) }),
        )
        .await;
        let mut unreachable = Vec::new();
        for (node_id, r) in answers {
            match r {
                Ok(list) => list.into_iter().for_each(|p| add(node_id, p)),
                Err(_) => unreachable.push(node_id),
            }
        }
        out.unreachable_nodes = unreachable;
        out.sessions.sort_by_key(|s| s.opened_at_ms);
        Ok(Response::new(out))
    }

    async fn kill(
        &self,
        req: Request<api::KillSessionRequest>,
    ) -> Result<Response<api::KillSessionResponse>, Status> {
        let t = &self.tunnels;
        let id = self
            .guard
            .authenticate(&t.node, &req, "sessions.kill")
            .await?;
        self.guard
            .require(&t.node, &id, &[Role::Admin], "end sessions")
            .await?;
        let r = req.into_inner();
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a reason is required: it is recorded with the session's end",
            ));
        }
        let why = crate::gateway::live::EndReason {
            by: id.label().to_owned(),
            reason: r.reason.clone(),
        };
        let mut host = None;
        if t.live.end(&r.session_id, why.clone()) {
            host = Some(t.node.id());
        } else {
            let members = crate::state::load_members(t.node.store()).map_err(storage_status)?;
            for m in members.iter().filter(|m| m.id != t.node.id()) {
                let req = custody_proto::cluster::v1::EndSessionRequest {
                    session_id: r.session_id.clone(),
                    by: why.by.clone(),
                    reason: why.reason.clone(),
                };
                if let Ok(true) = t.peers.end_session(m, req).await {
                    host = Some(m.id);
                    break;
                }
            }
        }
        let Some(node_id) = host else {
            return Err(Status::not_found(format!(
                "no live session {} on any node that answered",
                r.session_id
            )));
        };
        tracing::warn!(target: "audit", event = "session_killed", session = %r.session_id, by = %id.label(), node = node_id, reason = %r.reason, "a session was ended by an admin");
        Ok(Response::new(api::KillSessionResponse { node_id }))
    }

    async fn exec(
        &self,
        req: Request<Streaming<api::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let node = &self.tunnels.node;
        let (id, token_expires_at) = self
            .guard
            .authenticate_until(node, &req, "sessions.exec")
            .await?;
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
        let command = shell_join(&start.argv);
        let verdict = crate::gateway::authorize::authorize(
            node,
            &self.guard,
            crate::gateway::authorize::Ask {
                identity: &id,
                resource: &start.resource,
                kind: Kind::Shell,
                action: Action::Exec,
                command: Some(&command),
                request_id: start.request_id,
                approved_as: None,
            },
        )
        .await?;
        let cleared = match verdict {
            crate::gateway::authorize::Verdict::Cleared(c) => c,
            crate::gateway::authorize::Verdict::NeedsApproval(c, doc) => {
                doc.check_justification(&start.justification)
                    .map_err(Status::invalid_argument)?;
                let rule = c.decision().by.label();
                let req = pb::ApprovalRequest {
                    requester: id.principal(),
                    requester_label: id.label().to_owned(),
                    resource: c.resource().name.clone(),
                    kind: "command".into(),
                    action: Action::Exec.as_str().into(),
                    command: command.clone(),
                    command_sha256: command_digest(&command).to_vec().into(),
                    justification: start.justification.clone(),
                    approver_groups: doc.groups.clone(),
                    required: doc.count,
                    require_reason: doc.require_reason,
                    rule: rule.clone(),
                    timeout_ms: doc.timeout_ms(),
                    webhook: doc.webhook.clone().unwrap_or_default(),
                    ..Default::default()
                };
                let created = create_request(node, req).await?;
                tracing::warn!(target: "audit", event = "approval_requested", request = created.id, subject = %id.subject, resource = %c.resource().name, %rule, command_bytes = command.len());
                self.notifier.approval("approval_requested", &created);
                let (tx, rx) = mpsc::channel(1);
                let _ = tx
                    .send(out(api::exec_output::Kind::ApprovalRequired(Box::new(
                        created,
                    ))))
                    .await;
                return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
            }
        };
        let rule = cleared.decision().by.label();
        let resource = cleared.resource().clone();
        let started = crate::gateway::exec::start(
            &self.tunnels,
            cleared,
            crate::gateway::exec::ExecStart {
                target: crate::gateway::exec::Target::Shell,
                argv: start.argv.clone(),
                command: command.clone(),
                token_expires_at,
                client_addr,
                via: "exec",
                first_events: Vec::new(),
            },
        )
        .await?;
        let crate::gateway::exec::Started {
            session_id,
            edge,
            via_node,
            strict,
            session,
        } = started;
        tracing::info!(
            target: "audit",
            event = "session_opened",
            session = %session_id,
            subject = %id.subject,
            issuer = %id.issuer,
            client_kind = id.client_kind.as_str(),
            client = ?client_addr,
            resource = %resource.name,
            edge = %edge,
            via_node,
            %rule,
            command_bytes = command.len(),
            strict,
        );

        // The caller's messages, as the relay's input.
        let (in_tx, in_rx) = mpsc::channel(crate::tunnel::session::CHANNEL_FRAMES);
        tokio::spawn(async move {
            while let Ok(Some(m)) = input.message().await {
                let i = match m.kind {
                    Some(api::exec_input::Kind::Stdin(b)) => relay::Input::Stdin(b),
                    Some(api::exec_input::Kind::StdinEof(_)) => relay::Input::Eof,
                    _ => return,
                };
                if in_tx.send(i).await.is_err() {
                    return;
                }
            }
        });

        let (out_tx, out_rx) = mpsc::channel(crate::tunnel::session::CHANNEL_FRAMES);
        let started = api::ExecStarted {
            session_id: session_id.clone(),
            edge,
            via_node,
        };
        tokio::spawn(async move {
            let _ = out_tx
                .send(out(api::exec_output::Kind::Started(started)))
                .await;
            let finish = relay::run(session, in_rx, out_tx.clone(), |o| {
                out(match o {
                    relay::Output::Stdout(b) => api::exec_output::Kind::Stdout(b),
                    relay::Output::Stderr(b) => api::exec_output::Kind::Stderr(b),
                })
            })
            .await;
            let last = match &finish {
                relay::Finish::Exited { code, signal } => {
                    Some(out(api::exec_output::Kind::Exit(api::ExecExit {
                        code: *code,
                        signal: *signal,
                    })))
                }
                relay::Finish::CallerGone => None,
                relay::Finish::Unrecorded(e) => Some(Err(Status::unavailable(e.clone()))),
                relay::Finish::Aborted(msg) => Some(Err(Status::aborted(msg.clone()))),
            };
            if let Some(last) = last {
                let _ = out_tx.send(last).await;
            }
            tracing::info!(target: "audit", event = "session_closed", session = %session_id, finish = ?finish);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// The API view of a stored session record.
pub fn session_info(r: &pb::SessionRecord) -> api::SessionInfo {
    let s = r.summary.clone().unwrap_or_default();
    let e = r.end.clone().unwrap_or_default();
    api::SessionInfo {
        session_id: s.session_id,
        opened_at_ms: s.opened_at_ms,
        closed_at_ms: e.closed_at_ms,
        issuer: s.issuer,
        subject: s.subject,
        email: s.email,
        client_kind: s.client_kind,
        resource: s.resource,
        resource_kind: s.resource_kind,
        edge: s.edge,
        edge_region: s.edge_region,
        node_region: s.node_region,
        command: s.command,
        mode: s.mode,
        closed: r.closed,
        exit_code: e.exit_code,
        signal: e.signal,
        close_reason: e.reason,
        events: r.next_seq,
        chunks: r.chunks,
        raw_bytes: r.raw_bytes,
        stored_bytes: r.stored_bytes,
        head_sha256: hex(&r.head_sha256),
        purged_at_ms: r.purged_at_ms,
        purge_rule: r.purge_rule.clone(),
        via: s.via,
        actor: s.actor,
    }
}

/// Decodes a session's chunks and verifies their chain against its record
/// (without opening them). Any mismatch is reported as the corruption it is.
pub fn verified_chunks(
    rec: &pb::SessionRecord,
    raw_chunks: &[Vec<u8>],
) -> Result<Vec<ev::Chunk>, String> {
    use prost::Message as _;
    let id = rec.summary.as_ref().map_or("", |s| s.session_id.as_str());
    let chunks = raw_chunks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            ev::Chunk::decode(&b[..])
                .map_err(|e| format!("session {id}: chunk {i} does not decode: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if chunks.len() as u64 != rec.chunks {
        return Err(format!(
            "session {id}: {} chunks stored, {} recorded",
            chunks.len(),
            rec.chunks
        ));
    }
    let head = custody_proto::chain::verify_chain(&chunks).map_err(|e| e.to_string())?;
    if head[..] != rec.head_sha256[..] {
        return Err(format!(
            "session {id}: chain head differs from the session record"
        ));
    }
    Ok(chunks)
}

/// Decodes and verifies a session's chunks against its record, and opens
/// them; nothing unverified is returned.
pub fn verified_events(
    rec: &pb::SessionRecord,
    raw_chunks: &[Vec<u8>],
) -> Result<Vec<ev::Event>, String> {
    let mut events = Vec::new();
    for c in &verified_chunks(rec, raw_chunks)? {
        events.extend(custody_proto::chain::open_chunk(c).map_err(|e| e.to_string())?);
    }
    Ok(events)
}

/// Encoded event bytes per `Sessions.Get` page (well under the clients'
/// 4 MiB message limit).
const PAGE_BYTES: usize = 2 << 20;

/// The events of `chunks` from `from_seq`, up to about [`PAGE_BYTES`];
/// returns them with the seq the next page starts at (0: none).
fn page(chunks: &[ev::Chunk], from_seq: u64) -> Result<(Vec<ev::Event>, u64), String> {
    let mut events = Vec::new();
    let mut bytes = 0;
    for c in chunks.iter().filter(|c| c.last_seq >= from_seq) {
        for e in custody_proto::chain::open_chunk(c).map_err(|e| e.to_string())? {
            if e.seq < from_seq {
                continue;
            }
            if bytes >= PAGE_BYTES {
                return Ok((events, e.seq));
            }
            bytes += prost::Message::encoded_len(&e);
            events.push(e);
        }
    }
    Ok((events, 0))
}

/// The stream a terminal's input is recorded as.
pub const KEYSTROKES: &str = "keystrokes";

impl<E: Engine> SessionsService<E> {
    /// Admins and auditors read every session; others only their own.
    async fn reads_all(&self, id: &crate::auth::Identity) -> Result<bool, Status> {
        let policy = self.guard.policy(&self.tunnels.node).await?;
        let roles = self.guard.roles(&policy, id);
        Ok(roles.contains(&Role::Admin) || roles.contains(&Role::Auditor))
    }

    pub async fn list_sessions(
        &self,
        req: Request<api::ListSessionsRequest>,
    ) -> Result<Response<api::ListSessionsResponse>, Status> {
        let node = &self.tunnels.node;
        let id = self.guard.authenticate(node, &req, "sessions.list").await?;
        let all = self.reads_all(&id).await?;
        let r = req.into_inner();
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let mut q = crate::state::evidence::SessionQuery {
            identity: opt(r.identity),
            resource: opt(r.resource),
            region: opt(r.region),
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
            until_ms: (r.until_ms > 0).then_some(r.until_ms),
            limit: if r.limit == 0 {
                1000
            } else {
                r.limit.min(10_000) as usize
            },
        };
        if !all {
            q.identity = Some(format!("{}|{}", id.issuer, id.subject));
        }
        let found =
            crate::state::evidence::sessions_list(node.store(), &q).map_err(storage_status)?;
        Ok(Response::new(api::ListSessionsResponse {
            sessions: found.iter().map(session_info).collect(),
        }))
    }

    pub async fn get_session(
        &self,
        req: Request<api::GetSessionRequest>,
    ) -> Result<Response<api::GetSessionResponse>, Status> {
        let node = &self.tunnels.node;
        let id = self.guard.authenticate(node, &req, "sessions.get").await?;
        let all = self.reads_all(&id).await?;
        let req = req.into_inner();
        let sid = req.session_id;
        let rec = crate::state::evidence::session_get(node.store(), &sid)
            .map_err(storage_status)?
            .ok_or_else(|| Status::not_found(format!("no session {sid:?}")))?;
        let owner = rec
            .summary
            .as_ref()
            .is_some_and(|s| s.issuer == id.issuer && s.subject == id.subject);
        if !all && !owner {
            return Err(Status::permission_denied(format!(
                "{} may not read session {sid}: requires role admin or auditor",
                id.label()
            )));
        }
        if rec.purged_at_ms != 0 {
            // The record stays to show what existed; the events are gone.
            return Ok(Response::new(api::GetSessionResponse {
                session: Some(session_info(&rec)),
                events: vec![],
                next_seq: 0,
            }));
        }
        let mut raw =
            crate::state::evidence::session_chunks(node.store(), &sid).map_err(storage_status)?;
        // Chunks appended since the record was read are for a later read.
        raw.truncate(rec.chunks as usize);
        let (mut events, next_seq) = verified_chunks(&rec, &raw)
            .and_then(|chunks| page(&chunks, req.from_seq))
            .map_err(|e| {
                tracing::error!(target: "audit", event = "evidence_corrupt", session = %sid, detail = %e);
                Status::data_loss(format!("evidence is corrupt: {e}"))
            })?;
        if !all {
            // A terminal's keystrokes (passwords typed at prompts among
            // them) are for admins and auditors only.
            events.retain(
                |e| !matches!(&e.kind, Some(ev::event::Kind::Output(o)) if o.stream == KEYSTROKES),
            );
        }
        Ok(Response::new(api::GetSessionResponse {
            session: Some(session_info(&rec)),
            events,
            next_seq,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_stored_chunks_are_reported_not_served() {
        use custody_proto::chain::{build_chunk, chunk_hash};
        use prost::Message as _;
        let ev = |seq: u64| ev::Event {
            version: 1,
            session_id: "s".into(),
            seq,
            at_ms: seq,
            node_id: 1,
            kind: Some(ev::event::Kind::Output(ev::Output {
                stream: "stdout".into(),
                data: format!("line {seq}\n").into_bytes().into(),
                truncated: false,
                continued: false,
            })),
        };
        let c0 = build_chunk(0, [0; 32], vec![ev(0), ev(1)]).unwrap();
        let c1 = build_chunk(1, chunk_hash(&c0), vec![ev(2)]).unwrap();
        let rec = pb::SessionRecord {
            summary: Some(pb::SessionSummary {
                session_id: "s".into(),
                ..Default::default()
            }),
            chunks: 2,
            head_sha256: chunk_hash(&c1).to_vec().into(),
            ..Default::default()
        };
        let good = vec![c0.encode_to_vec(), c1.encode_to_vec()];
        assert_eq!(verified_events(&rec, &good).unwrap().len(), 3);
        // Every single-byte flip in the stored bytes is caught.
        for i in 0..good[0].len() {
            let mut bad = good.clone();
            bad[0][i] ^= 0x40;
            assert!(
                verified_events(&rec, &bad).is_err(),
                "flip at byte {i} not caught"
            );
        }
        // A missing chunk, and a record whose head differs.
        assert!(verified_events(&rec, &good[..1]).is_err());
        let mut other = rec.clone();
        other.head_sha256 = vec![0u8; 32].into();
        assert!(verified_events(&other, &good).is_err());
    }

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
