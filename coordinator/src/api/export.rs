//! `custody.v1.Evidence`: signed compliance exports.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;
use custody_proto::export::{chunk_json, event_json, hex};
use custody_proto::v1 as api;
use custody_proto::v1::evidence_server::Evidence;

use super::sessions::verified_events;
use super::{status_from, storage_status, Guard};
use crate::consensus::NodeHandle;
use crate::evidence::export::{csv_row, SigningKey, CSV_HEADER, FORMAT};
use crate::policy::Role;
use crate::state::evidence::{
    check_hold, holds_list, session_chunks, sessions_list, RetentionCommand, SessionQuery,
    PURGE_LIMIT,
};
use crate::state::Command;
use crate::storage::Engine;

/// Bytes per data frame.
const FRAME: usize = 256 << 10;

pub struct EvidenceService<E: Engine> {
    node: NodeHandle<E>,
    guard: Arc<Guard>,
    key: Option<Arc<SigningKey>>,
    cluster_id: String,
}

impl<E: Engine> EvidenceService<E> {
    pub fn new(
        node: NodeHandle<E>,
        guard: Arc<Guard>,
        key: Option<Arc<SigningKey>>,
        cluster_id: String,
    ) -> Self {
        Self {
            node,
            guard,
            key,
            cluster_id,
        }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<api::ExportFrame, Status>> + Send>>;

fn frame(kind: api::export_frame::Kind) -> Result<api::ExportFrame, Status> {
    Ok(api::ExportFrame { kind: Some(kind) })
}

/// Streams one file and returns its (sha256 hex, bytes).
struct FileWriter<'a> {
    tx: &'a mpsc::Sender<Result<api::ExportFrame, Status>>,
    hash: Sha256,
    buf: Vec<u8>,
    len: u64,
}

impl<'a> FileWriter<'a> {
    async fn start(
        tx: &'a mpsc::Sender<Result<api::ExportFrame, Status>>,
        name: &str,
    ) -> Option<FileWriter<'a>> {
        tx.send(frame(api::export_frame::Kind::File(name.into())))
            .await
            .ok()?;
        Some(Self {
            tx,
            hash: Sha256::new(),
            buf: Vec::new(),
            len: 0,
        })
    }

    async fn write(&mut self, b: &[u8]) -> Option<()> {
        self.hash.update(b);
        self.len += b.len() as u64;
        self.buf.extend_from_slice(b);
        if self.buf.len() >= FRAME {
            let data = std::mem::take(&mut self.buf);
            self.tx
                .send(frame(api::export_frame::Kind::Data(data)))
                .await
                .ok()?;
        }
        Some(())
    }

    async fn finish(self) -> Option<(String, u64)> {
        if !self.buf.is_empty() {
            self.tx
                .send(frame(api::export_frame::Kind::Data(self.buf)))
                .await
                .ok()?;
        }
        let h: [u8; 32] = self.hash.finalize().into();
        Some((hex(&h), self.len))
    }
}

fn decode_chunks(raw: &[Vec<u8>]) -> Vec<ev::Chunk> {
    raw.iter()
        .filter_map(|b| ev::Chunk::decode(&b[..]).ok())
        .collect()
}

impl<E: Engine> EvidenceService<E> {
    /// Authenticates the call and requires one of `roles`.
    async fn caller<T>(
        &self,
        req: &Request<T>,
        op: &str,
        roles: &[Role],
        what: &str,
    ) -> Result<crate::auth::Identity, Status> {
        let id = self.guard.authenticate(&self.node, req, op).await?;
        self.guard.require(&self.node, &id, roles, what).await?;
        Ok(id)
    }

    fn hold(&self, id: u64) -> Result<pb::LegalHold, Status> {
        holds_list(self.node.store(), true)
            .map_err(storage_status)?
            .into_iter()
            .find(|h| h.id == id)
            .ok_or_else(|| Status::not_found(format!("no legal hold {id}")))
    }
}

/// Proposes purges until one purges less than the limit; returns the total.
pub async fn purge_expired<E: Engine>(node: &NodeHandle<E>) -> Result<u64, Status> {
    let mut total = 0;
    loop {
        let out = node
            .propose(
                Command::Retention(RetentionCommand::Purge { limit: PURGE_LIMIT }),
                None,
            )
            .await
            .map_err(status_from)?;
        total += out.value;
        if out.value < u64::from(PURGE_LIMIT) {
            return Ok(total);
        }
    }
}

#[tonic::async_trait]
impl<E: Engine> Evidence for EvidenceService<E> {
    type ExportStream = ExportStream;

    async fn purge(
        &self,
        req: Request<api::PurgeRequest>,
    ) -> Result<Response<api::PurgeResponse>, Status> {
        let id = self
            .caller(&req, "evidence.purge", &[Role::Admin], "purge evidence")
            .await?;
        let purged = purge_expired(&self.node).await?;
        tracing::info!(target: "audit", event = "evidence_purged", by = %id.label(), purged);
        Ok(Response::new(api::PurgeResponse { purged }))
    }

    async fn set_hold(
        &self,
        req: Request<api::SetHoldRequest>,
    ) -> Result<Response<pb::LegalHold>, Status> {
        let id = self
            .caller(
                &req,
                "evidence.set_hold",
                &[Role::Admin, Role::Auditor],
                "place legal holds",
            )
            .await?;
        let r = req.into_inner();
        let hold = pb::LegalHold {
            reason: r.reason,
            created_by: id.label().to_owned(),
            session_id: r.session_id,
            resource: r.resource,
            subject: r.subject,
            ..Default::default()
        };
        check_hold(&hold).map_err(Status::invalid_argument)?;
        let out = self
            .node
            .propose(Command::Retention(RetentionCommand::SetHold(hold)), None)
            .await
            .map_err(status_from)?;
        if let Some(why) = out.rejected {
            return Err(Status::invalid_argument(why));
        }
        tracing::info!(target: "audit", event = "legal_hold_set", by = %id.label(), hold = out.value);
        Ok(Response::new(self.hold(out.value)?))
    }

    async fn release_hold(
        &self,
        req: Request<api::ReleaseHoldRequest>,
    ) -> Result<Response<pb::LegalHold>, Status> {
        let id = self
            .caller(
                &req,
                "evidence.release_hold",
                &[Role::Admin, Role::Auditor],
                "release legal holds",
            )
            .await?;
        let r = req.into_inner();
        if r.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "releasing a legal hold needs a reason",
            ));
        }
        let out = self
            .node
            .propose(
                Command::Retention(RetentionCommand::ReleaseHold {
                    id: r.id,
                    by: id.label().to_owned(),
                    reason: r.reason,
                }),
                None,
            )
            .await
            .map_err(status_from)?;
        if let Some(why) = out.rejected {
            return Err(if why.starts_with("no legal hold") {
                Status::not_found(why)
            } else {
                Status::failed_precondition(why)
            });
        }
        tracing::info!(target: "audit", event = "legal_hold_released", by = %id.label(), hold = r.id);
        Ok(Response::new(self.hold(r.id)?))
    }

    async fn list_holds(
        &self,
        req: Request<api::ListHoldsRequest>,
    ) -> Result<Response<api::ListHoldsResponse>, Status> {
        self.caller(
            &req,
            "evidence.list_holds",
            &[Role::Admin, Role::Auditor],
            "list legal holds",
        )
        .await?;
        self.node.read_index().await.map_err(status_from)?;
        let holds = holds_list(self.node.store(), req.into_inner().all)
            .map_err(storage_status)?
            .into_iter()
            .collect();
        Ok(Response::new(api::ListHoldsResponse { holds }))
    }

    async fn export(
        &self,
        req: Request<api::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let id = self
            .caller(
                &req,
                "evidence.export",
                &[Role::Admin, Role::Auditor],
                "export evidence",
            )
            .await?;
        let key = self.key.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this coordinator has no evidence signing key ([evidence] signing_key)",
            )
        })?;
        self.node.read_index().await.map_err(status_from)?;
        let r = req.into_inner();
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let q = SessionQuery {
            identity: opt(&r.identity),
            resource: opt(&r.resource),
            region: opt(&r.region),
            since_ms: (r.from_ms > 0).then_some(r.from_ms),
            until_ms: (r.to_ms > 0).then_some(r.to_ms),
            limit: 0,
        };
        let sessions = sessions_list(self.node.store(), &q).map_err(storage_status)?;
        // Verify everything before streaming anything.
        let mut loaded: Vec<(pb::SessionRecord, Vec<ev::Chunk>, Vec<ev::Event>)> = Vec::new();
        for rec in sessions {
            let sid = rec
                .summary
                .as_ref()
                .map(|s| s.session_id.clone())
                .unwrap_or_default();
            let raw = session_chunks(self.node.store(), &sid).map_err(storage_status)?;
            let events = verified_events(&rec, &raw).map_err(|e| {
                tracing::error!(target: "audit", event = "evidence_corrupt", session = %sid, detail = %e);
                Status::data_loss(format!("evidence is corrupt: {e}"))
            })?;
            loaded.push((rec, decode_chunks(&raw), events));
        }
        tracing::info!(target: "audit", event = "evidence_exported", by = %id.label(), sessions = loaded.len());
        let (tx, rx) = mpsc::channel(16);
        let cluster_id = self.cluster_id.clone();
        tokio::spawn(async move {
            let total = loaded.len() as u64;
            let mut files = Vec::new();
            // chunks.jsonl
            let Some(mut w) = FileWriter::start(&tx, "chunks.jsonl").await else {
                return;
            };
            for (_, chunks, _) in &loaded {
                for c in chunks {
                    let line = chunk_json(c).to_string() + "\n";
                    if w.write(line.as_bytes()).await.is_none() {
                        return;
                    }
                }
            }
            let Some(f) = w.finish().await else { return };
            files.push(("chunks.jsonl", f));
            // events.jsonl
            let Some(mut w) = FileWriter::start(&tx, "events.jsonl").await else {
                return;
            };
            for (i, (_, _, events)) in loaded.iter().enumerate() {
                for e in events {
                    let line = event_json(e).to_string() + "\n";
                    if w.write(line.as_bytes()).await.is_none() {
                        return;
                    }
                }
                if i % 50 == 49 {
                    let p = api::ExportProgress {
                        sessions_done: i as u64 + 1,
                        sessions_total: total,
                    };
                    if tx
                        .send(frame(api::export_frame::Kind::Progress(p)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let Some(f) = w.finish().await else { return };
            files.push(("events.jsonl", f));
            // sessions.csv
            let Some(mut w) = FileWriter::start(&tx, "sessions.csv").await else {
                return;
            };
            if w.write(CSV_HEADER.as_bytes()).await.is_none() {
                return;
            }
            for (rec, _, _) in &loaded {
                if w.write(csv_row(rec).as_bytes()).await.is_none() {
                    return;
                }
            }
            let Some(f) = w.finish().await else { return };
            files.push(("sessions.csv", f));

            let manifest = serde_json::json!({
                "format": FORMAT,
                "cluster_id": cluster_id,
                "created_at_ms": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                "query": {
                    "from_ms": r.from_ms, "to_ms": r.to_ms, "region": r.region,
                    "resource": r.resource, "identity": r.identity,
                },
                "time_range": {
                    "first_opened_ms": loaded.iter().filter_map(|(r, _, _)| r.summary.as_ref().map(|s| s.opened_at_ms)).min(),
                    "last_opened_ms": loaded.iter().filter_map(|(r, _, _)| r.summary.as_ref().map(|s| s.opened_at_ms)).max(),
                },
                "files": files.iter().map(|(name, (sha, len))| serde_json::json!({
                    "name": name, "sha256": sha, "bytes": len,
                })).collect::<Vec<_>>(),
                "sessions": loaded.iter().map(|(rec, chunks, events)| serde_json::json!({
                    "session_id": rec.summary.as_ref().map(|s| s.session_id.clone()).unwrap_or_default(),
                    "chunks": chunks.len(),
                    "events": events.len(),
                    "closed": rec.closed,
                    "chain_head": hex(&rec.head_sha256),
                })).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
            let signature = key.sign(&bytes);
            let _ = tx
                .send(frame(api::export_frame::Kind::Manifest(
                    api::ExportManifest {
                        manifest_json: bytes,
                        signature,
                    },
                )))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
