//! Session evidence recording.
//!
//! One [`SessionRecorder`] per session batches events into chunks (256 KiB or
//! 50 ms), compresses them with zstd, links them into the session's hash chain
//! and proposes them through Raft, one at a time and in order. A slow cluster
//! slows the session: the recorder's queue is bounded and callers wait on it.
//! Each chunk carries an idempotency key (`ev/<session>/<index>`), so a retry
//! after a leader change is applied once.

pub mod export;

use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use custody_proto::chain::{build_chunk, chunk_hash};
use custody_proto::cluster::v1 as pb;
use custody_proto::evidence::v1 as ev;

use crate::consensus::node::now_ms;
use crate::consensus::{NodeError, NodeHandle};
use crate::state::evidence::AppendChunk;
use crate::state::Command;
use crate::storage::Engine;

/// Flush a chunk once this many raw bytes are buffered...
pub const CHUNK_BYTES: usize = 256 << 10;
/// ...or once the oldest buffered event is this old.
pub const CHUNK_AGE: Duration = Duration::from_millis(50);
/// How long one chunk may take to commit before the session is failed.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(5);
/// Events queued ahead of the recorder (backpressure beyond this).
const QUEUE: usize = 64;
/// Output recorded per session before it is cut (the cut itself is recorded).
pub const DEFAULT_OUTPUT_CAP: u64 = 64 << 20;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("evidence could not be committed: {0}")]
    Commit(String),
    #[error("the evidence recorder stopped: {0}")]
    Stopped(String),
}

enum Msg {
    Events(Vec<ev::event::Kind>),
    /// Record these, then flush and reply once committed.
    Commit(
        Vec<ev::event::Kind>,
        oneshot::Sender<Result<(), RecordError>>,
    ),
    Close(pb::SessionEnd, oneshot::Sender<Result<(), RecordError>>),
}

/// Records one session.
pub struct SessionRecorder {
    tx: mpsc::Sender<Msg>,
    session_id: String,
}

fn retryable(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::NoLeader | NodeError::LeaderChanged | NodeError::Timeout
    )
}

impl SessionRecorder {
    /// Starts recording; `summary` goes with the first chunk.
    pub fn start<E: Engine>(node: NodeHandle<E>, summary: pb::SessionSummary) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let session_id = summary.session_id.clone();
        let task = Task {
            node,
            session_id: session_id.clone(),
            summary: Some(summary),
            seq: 0,
            index: 0,
            prev: [0; 32],
            buf: Vec::new(),
            buf_bytes: 0,
            oldest: None,
            failed: None,
        };
        tokio::spawn(task.run(rx));
        Self { tx, session_id }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Queues an event (waits while the queue is full).
    pub async fn record(&self, kind: ev::event::Kind) -> Result<(), RecordError> {
        self.record_all(vec![kind]).await
    }

    /// Queues events in order, in one message to the recorder (a busy
    /// session hands over a batch instead of waking the recorder per event).
    pub async fn record_all(&self, kinds: Vec<ev::event::Kind>) -> Result<(), RecordError> {
        if kinds.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Msg::Events(kinds))
            .await
            .map_err(|_| RecordError::Stopped("recorder gone".into()))
    }

    /// Flushes everything queued and waits until it is committed.
    pub async fn commit(&self) -> Result<(), RecordError> {
        self.commit_with(Vec::new()).await
    }

    /// Queues `kinds`, flushes everything queued and waits until it is
    /// committed.
    pub async fn commit_with(&self, kinds: Vec<ev::event::Kind>) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Commit(kinds, reply))
            .await
            .map_err(|_| RecordError::Stopped("recorder gone".into()))?;
        rx.await
            .map_err(|_| RecordError::Stopped("recorder gone".into()))?
    }

    /// Records `session_closed` and the session's end, and waits for commit.
    pub async fn close(&self, end: pb::SessionEnd) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Close(end, reply))
            .await
            .map_err(|_| RecordError::Stopped("recorder gone".into()))?;
        rx.await
            .map_err(|_| RecordError::Stopped("recorder gone".into()))?
    }
}

struct Task<E: Engine> {
    node: NodeHandle<E>,
    session_id: String,
    summary: Option<pb::SessionSummary>,
    seq: u64,
    index: u64,
    prev: [u8; 32],
    buf: Vec<ev::Event>,
    buf_bytes: usize,
    oldest: Option<Instant>,
    failed: Option<RecordError>,
}

impl<E: Engine> Task<E> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            let deadline = self.oldest.map(|t| t + CHUNK_AGE);
            let msg = tokio::select! {
                biased;
                m = rx.recv() => m,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = self.flush(None).await;
                    continue;
                }
            };
            match msg {
                Some(Msg::Events(kinds)) => {
                    // A failure is kept and reported by the next commit.
                    let _ = self.push_all(kinds).await;
                }
                Some(Msg::Commit(kinds, reply)) => {
                    let r = self.push_all(kinds).await;
                    let _ = reply.send(r.and(self.flush(None).await));
                }
                Some(Msg::Close(end, reply)) => {
                    self.push(ev::event::Kind::Closed(ev::SessionClosed {
                        reason: end.reason.clone(),
                    }));
                    let _ = reply.send(self.flush(Some(end)).await);
                    return;
                }
                None => {
                    // Dropped without close: still end the chain.
                    let reason = "the session ended without closing its recorder".to_string();
                    self.push(ev::event::Kind::Closed(ev::SessionClosed {
                        reason: reason.clone(),
                    }));
                    let end = pb::SessionEnd {
                        closed_at_ms: now_ms(),
                        reason,
                        ..Default::default()
                    };
                    if let Err(e) = self.flush(Some(end)).await {
                        tracing::error!(session = %self.session_id, error = %e, "could not close the evidence chain");
                    }
                    return;
                }
            }
        }
    }

    /// Buffers events in order, flushing whenever a chunk is full.
    async fn push_all(&mut self, kinds: Vec<ev::event::Kind>) -> Result<(), RecordError> {
        let mut r = Ok(());
        for kind in kinds {
            self.push(kind);
            if self.buf_bytes >= CHUNK_BYTES {
                r = r.and(self.flush(None).await);
            }
        }
        r
    }

    fn push(&mut self, kind: ev::event::Kind) {
        let e = ev::Event {
            version: 1,
            session_id: self.session_id.clone(),
            seq: self.seq,
            at_ms: now_ms(),
            node_id: self.node.id(),
            kind: Some(kind),
        };
        self.seq += 1;
        self.buf_bytes += e.encoded_len();
        self.buf.push(e);
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Proposes the buffered events as one chunk and waits for the commit.
    async fn flush(&mut self, end: Option<pb::SessionEnd>) -> Result<(), RecordError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.buf);
        self.buf_bytes = 0;
        self.oldest = None;
        let r = self.append(events, end).await;
        if let Err(e) = &r {
            tracing::error!(session = %self.session_id, error = %e, "evidence recording failed");
            self.failed = Some(e.clone());
        }
        r
    }

    async fn append(
        &mut self,
        events: Vec<ev::Event>,
        end: Option<pb::SessionEnd>,
    ) -> Result<(), RecordError> {
        let chunk = build_chunk(self.index, self.prev, events)
            .map_err(|e| RecordError::Commit(e.to_string()))?;
        let sha256 = chunk_hash(&chunk);
        let cmd = Command::Evidence(Box::new(AppendChunk {
            chunk: chunk.encode_to_vec(),
            sha256,
            open: if self.index == 0 {
                self.summary.take()
            } else {
                None
            },
            end,
        }));
        let key = format!("ev/{}/{}", self.session_id, self.index);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.node.propose(cmd.clone(), Some(key.clone())).await {
                Ok(o) => {
                    if let Some(why) = o.rejected {
                        return Err(RecordError::Commit(why));
                    }
                    self.index += 1;
                    self.prev = sha256;
                    return Ok(());
                }
                Err(e) if retryable(&e) && started.elapsed() < COMMIT_DEADLINE => {
                    tracing::debug!(session = %self.session_id, error = %e, "evidence chunk: retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(RecordError::Commit(e.to_string())),
            }
        }
    }
}
