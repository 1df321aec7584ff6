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
    check_hold, holds_list, ledger_hash_at, ledger_head, ledger_range, session_chunks, session_get,
    sessions_list, RetentionCommand, SessionQuery, PURGE_LIMIT,
};
use crate::state::Command;
use crate::storage::Engine;
use custody_proto::ledger;

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

/// Proposes purges until one has walked to the end of what may have expired
/// (each walks a bounded part of the time index); returns the total.
pub async fn purge_expired<E: Engine>(node: &NodeHandle<E>) -> Result<u64, Status> {
    let mut total = 0;
    // A full walk of the index; the bound only guards against a bug looping.
    for _ in 0..100_000 {
        let out = node
            .propose_retrying(
                Command::Retention(RetentionCommand::Purge { limit: PURGE_LIMIT }),
                None,
            )
            .await
            .map_err(status_from)?;
        total += out.value;
        if !out.existed {
            return Ok(total);
        }
    }
    Ok(total)
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
            .propose_retrying(Command::Retention(RetentionCommand::SetHold(hold)), None)
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
            .propose_retrying(
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
        let store = self.node.store();
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let q = SessionQuery {
            identity: opt(&r.identity),
            resource: opt(&r.resource),
            region: opt(&r.region),
            since_ms: (r.from_ms > 0).then_some(r.from_ms),
            until_ms: (r.to_ms > 0).then_some(r.to_ms),
            limit: 0,
        };
        let selection = ledger::Selection {
            identity: r.identity.clone(),
            resource: r.resource.clone(),
            region: r.region.clone(),
            from_ms: r.from_ms,
            to_ms: r.to_ms,
        };
        // The ledger range first: every session it names is accounted for.
        let (head_seq, head_hash) = ledger_head(store).map_err(storage_status)?;
        if r.after_ledger_seq > head_seq {
            return Err(Status::invalid_argument(format!(
                "the evidence ledger ends at entry {head_seq}; an export cannot start after entry {}",
                r.after_ledger_seq
            )));
        }
        let from_hash = ledger_hash_at(store, r.after_ledger_seq)
            .map_err(storage_status)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "ledger entry {} is not on this node",
                    r.after_ledger_seq
                ))
            })?;
        let entries =
            ledger_range(store, r.after_ledger_seq + 1, head_seq).map_err(storage_status)?;
        // Sessions in order: from the start of the ledger, every session the
        // query selects (older ones were recorded before the ledger existed);
        // then those the range names that are not among them (purged ones).
        let mut ids: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if r.after_ledger_seq == 0 {
            for rec in sessions_list(store, &q).map_err(storage_status)? {
                if let Some(s) = rec.summary {
                    if seen.insert(s.session_id.clone()) {
                        ids.push(s.session_id);
                    }
                }
            }
        }
        for e in entries.iter().filter(|e| selection.selects(e)) {
            if seen.insert(e.session_id.clone()) {
                ids.push(e.session_id.clone());
            }
        }
        let mut loaded = Vec::with_capacity(ids.len());
        for sid in &ids {
            let Some(rec) = session_get(store, sid).map_err(storage_status)? else {
                return Err(Status::data_loss(format!(
                    "session {sid} is in the evidence ledger but has no record"
                )));
            };
            loaded.push(load_session(store, rec).map_err(storage_status)?);
        }
        let unreadable = loaded.iter().filter(|s| s.unreadable.is_some()).count();
        tracing::info!(target: "audit", event = "evidence_exported", by = %id.label(), sessions = loaded.len(), unreadable, ledger_from = r.after_ledger_seq + 1, ledger_to = head_seq);
        let (tx, rx) = mpsc::channel(16);
        let cluster_id = self.cluster_id.clone();
        tokio::spawn(async move {
            let ledger_info = serde_json::json!({
                "from_seq": r.after_ledger_seq + 1,
                "to_seq": head_seq,
                "from_sha256": hex(&from_hash),
                "head_sha256": hex(&head_hash),
                "entries": entries.len(),
            });
            let Some(files) = write_files(&tx, &loaded, &entries).await else {
                return;
            };
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
                "ledger": ledger_info,
                "time_range": {
                    "first_opened_ms": loaded.iter().filter_map(|s| s.rec.summary.as_ref().map(|s| s.opened_at_ms)).min(),
                    "last_opened_ms": loaded.iter().filter_map(|s| s.rec.summary.as_ref().map(|s| s.opened_at_ms)).max(),
                },
                "files": files.iter().map(|(name, (sha, len))| serde_json::json!({
                    "name": name, "sha256": sha, "bytes": len,
                })).collect::<Vec<_>>(),
                "sessions": loaded.iter().map(ExportedSession::manifest_json).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
            let signature = key.sign(&bytes);
            if tx
                .send(frame(api::export_frame::Kind::Manifest(
                    api::ExportManifest {
                        manifest_json: bytes,
                        signature,
                    },
                )))
                .await
                .is_err()
            {
                tracing::warn!("the export's caller left before the manifest");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One session as an export holds it.
#[derive(Debug)]
pub struct ExportedSession {
    pub rec: pb::SessionRecord,
    pub chunks: Vec<ev::Chunk>,
    /// Empty for purged and unreadable sessions.
    pub events: Vec<ev::Event>,
    /// Why the session's chunks cannot be read (chunks of an older version,
    /// or damage); the export goes on without its events.
    pub unreadable: Option<String>,
}

impl ExportedSession {
    /// `open`, `closed`, `purged` or `unreadable`.
    pub fn state(&self) -> &'static str {
        if self.rec.purged_at_ms != 0 {
            "purged"
        } else if self.unreadable.is_some() {
            "unreadable"
        } else if self.rec.closed {
            "closed"
        } else {
            "open"
        }
    }

    fn manifest_json(&self) -> serde_json::Value {
        let rec = &self.rec;
        let mut v = serde_json::json!({
            "session_id": rec.summary.as_ref().map(|s| s.session_id.clone()).unwrap_or_default(),
            "state": self.state(),
            "chunks": rec.chunks,
            "events": rec.next_seq,
            "closed": rec.closed,
            "chain_head": hex(&rec.head_sha256),
        });
        if rec.purged_at_ms != 0 {
            v["purged_at_ms"] = rec.purged_at_ms.into();
            v["purge_rule"] = rec.purge_rule.clone().into();
        }
        if let Some(why) = &self.unreadable {
            v["unreadable"] = why.clone().into();
        }
        v
    }
}

/// Reads one session for an export: its chunks and events, verified, or
/// the reason they cannot be read.
pub fn load_session<E: Engine>(
    store: &crate::storage::RaftStore<E>,
    rec: pb::SessionRecord,
) -> Result<ExportedSession, crate::storage::StorageError> {
    if rec.purged_at_ms != 0 {
        return Ok(ExportedSession {
            rec,
            chunks: Vec::new(),
            events: Vec::new(),
            unreadable: None,
        });
    }
    let sid = rec
        .summary
        .as_ref()
        .map(|s| s.session_id.clone())
        .unwrap_or_default();
    let mut raw = session_chunks(store, &sid)?;
    // Chunks appended since the record was read belong to a later export.
    raw.truncate(rec.chunks as usize);
    let (events, unreadable) = match verified_events(&rec, &raw) {
        Ok(events) => (events, None),
        Err(e) => {
            tracing::error!(target: "audit", event = "evidence_unreadable", session = %sid, detail = %e);
            (Vec::new(), Some(e))
        }
    };
    Ok(ExportedSession {
        rec,
        chunks: decode_chunks(&raw),
        events,
        unreadable,
    })
}

/// Streams the export's files; returns each file's (name, (sha256, bytes)).
async fn write_files(
    tx: &mpsc::Sender<Result<api::ExportFrame, Status>>,
    loaded: &[ExportedSession],
    entries: &[ev::LedgerEntry],
) -> Option<Vec<(&'static str, (String, u64))>> {
    let total = loaded.len() as u64;
    let mut files = Vec::new();
    let mut w = FileWriter::start(tx, "chunks.jsonl").await?;
    for s in loaded {
        for c in &s.chunks {
            w.write((chunk_json(c).to_string() + "\n").as_bytes())
                .await?;
        }
    }
    files.push(("chunks.jsonl", w.finish().await?));
    let mut w = FileWriter::start(tx, "events.jsonl").await?;
    for (i, s) in loaded.iter().enumerate() {
        for e in &s.events {
            w.write((event_json(e).to_string() + "\n").as_bytes())
                .await?;
        }
        if i % 50 == 49 {
            let p = api::ExportProgress {
                sessions_done: i as u64 + 1,
                sessions_total: total,
            };
            tx.send(frame(api::export_frame::Kind::Progress(p)))
                .await
                .ok()?;
        }
    }
    files.push(("events.jsonl", w.finish().await?));
    let mut w = FileWriter::start(tx, "sessions.csv").await?;
    w.write(CSV_HEADER.as_bytes()).await?;
    for s in loaded {
        w.write(csv_row(&s.rec).as_bytes()).await?;
    }
    files.push(("sessions.csv", w.finish().await?));
    let mut w = FileWriter::start(tx, "ledger.jsonl").await?;
    for e in entries {
        w.write((ledger::entry_json(e).to_string() + "\n").as_bytes())
            .await?;
    }
    files.push(("ledger.jsonl", w.finish().await?));
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{state_cf, MemEngine, Op, RaftStore};
    use custody_proto::chain::{build_chunk, chunk_hash};

    /// Writes a session straight into state, as an older version could have
    /// (no apply checks), with one chunk holding `events`.
    fn stored_session(store: &RaftStore<MemEngine>, id: &str, events: Vec<ev::Event>) {
        let c = build_chunk(0, [0; 32], events).unwrap();
        let rec = pb::SessionRecord {
            summary: Some(pb::SessionSummary {
                session_id: id.into(),
                ..Default::default()
            }),
            closed: c.last,
            chunks: 1,
            head_sha256: chunk_hash(&c).to_vec().into(),
            next_seq: c.last_seq + 1,
            ..Default::default()
        };
        let ck = format!("ev/c/{id}/{:010}", 0).into_bytes();
        let sk = format!("ev/s/{id}").into_bytes();
        let ops = vec![
            Op::Put(state_cf(&ck), ck, c.encode_to_vec()),
            Op::Put(state_cf(&sk), sk, rec.encode_to_vec()),
        ];
        store.apply(ops, 1, 1, None).unwrap();
    }

    fn output(id: &str, seq: u64, n: usize) -> ev::Event {
        ev::Event {
            session_id: id.into(),
            seq,
            kind: Some(ev::event::Kind::Output(ev::Output {
                stream: "stdout".into(),
                data: vec![b'x'; n].into(),
                truncated: false,
                continued: false,
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_an_older_version_wrote_too_large_is_exported_as_unreadable() {
        let store = RaftStore::open(MemEngine::new()).unwrap();
        // One 9 MiB event in one chunk: what the recorder wrote before events
        // were split.
        stored_session(&store, "old", vec![output("old", 0, 9 << 20)]);
        stored_session(&store, "fine", vec![output("fine", 0, 10)]);
        let load = |id: &str| {
            let rec = session_get(&store, id).unwrap().unwrap();
            load_session(&store, rec).unwrap()
        };
        let old = load("old");
        assert_eq!(old.state(), "unreadable");
        assert!(old.unreadable.as_deref().unwrap().contains("raw bytes"));
        assert!(old.events.is_empty());
        assert_eq!(old.chunks.len(), 1, "its chunks are still exported");
        let m = old.manifest_json();
        assert_eq!(m["state"], "unreadable");
        assert!(m["unreadable"].as_str().unwrap().contains("chunk 0"));
        let fine = load("fine");
        assert_eq!((fine.state(), fine.events.len()), ("open", 1));
    }
}
