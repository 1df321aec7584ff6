//! Session evidence recording.
//!
//! One [`SessionRecorder`] per session batches events into chunks (256 KiB or
//! 50 ms), compresses them with zstd, links them into the session's hash chain
//! and proposes them through Raft, one at a time and in order. Each chunk
//! carries an idempotency key (`<session>/<index>`, scoped to evidence by the
//! state machine), so a retry after a leader change is applied once.
//!
//! A session is recorded or it ends, nothing in between:
//! - a chunk that fails to commit is retried with the same key until
//!   [`COMMIT_DEADLINE`] (longer than a leader election and than one proposal's
//!   own timeout) has passed;
//! - after that the recorder has *failed*: every later `record`/`commit`
//!   returns the error (so the session ends), [`SessionRecorder::failed`]
//!   wakes whoever waits on it, and a background retry keeps proposing what
//!   was accepted, then the session's end with its reason, until the cluster
//!   takes writes again;
//! - memory is bounded: events wait in at most [`BUFFER_BYTES`] per session;
//!   when that is full the caller waits (backpressure), and a wait longer
//!   than the deadline fails the recorder too.
//!
//! No event is larger than [`MAX_EVENT_DATA`]: large output is split into
//! consecutive `continued` events and anything else into fragments
//! ([`custody_proto::chain::split_event`]), so no chunk comes near
//! [`custody_proto::chain::MAX_RAW_CHUNK`].

pub mod export;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use custody_proto::chain::{build_chunk, chunk_hash, split_event, MAX_EVENT_DATA};
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
/// How long evidence may fail to commit (or wait for room in the buffer)
/// before the session is ended: longer than a leader election (about 1 s)
/// and than three attempts at the node's own 5 s proposal timeout.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(15);
/// Bytes of events one session may have accepted but not yet committed.
pub const BUFFER_BYTES: usize = 8 << 20;
/// Messages queued ahead of the recorder (the byte budget binds first).
const QUEUE: usize = 64;
/// Output recorded per session before it is cut (the cut itself is recorded).
pub const DEFAULT_OUTPUT_CAP: u64 = 64 << 20;
/// Longest pause between proposals while the cluster takes no writes.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("evidence could not be committed: {0}")]
    Commit(String),
    #[error("the evidence recorder stopped: {0}")]
    Stopped(String),
}

/// Events, each with the buffer bytes it holds, and their sum.
struct Batch {
    kinds: Vec<(ev::event::Kind, usize)>,
    bytes: usize,
}

enum Msg {
    Events(Batch),
    /// Record these, then flush and reply once committed.
    Commit(Batch, oneshot::Sender<Result<(), RecordError>>),
    Close(pb::SessionEnd, oneshot::Sender<Result<(), RecordError>>),
}

/// Records one session.
pub struct SessionRecorder {
    tx: mpsc::Sender<Msg>,
    session_id: String,
    budget: Arc<Semaphore>,
    failed: watch::Receiver<Option<RecordError>>,
    failed_tx: Arc<watch::Sender<Option<RecordError>>>,
    deadline: Duration,
}

fn retryable(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::NoLeader | NodeError::LeaderChanged | NodeError::Timeout
    )
}

/// The buffer bytes one event holds (its encoding plus the event header).
fn held_bytes(kind: &ev::event::Kind) -> usize {
    kind.encoded_len() + 48
}

impl SessionRecorder {
    /// Starts recording; `summary` goes with the first chunk.
    pub fn start<E: Engine>(node: NodeHandle<E>, summary: pb::SessionSummary) -> Self {
        Self::start_with(node, summary, COMMIT_DEADLINE)
    }

    /// [`SessionRecorder::start`] with another commit deadline (tests).
    pub fn start_with<E: Engine>(
        node: NodeHandle<E>,
        summary: pb::SessionSummary,
        deadline: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (failed_tx, failed) = watch::channel(None);
        let failed_tx = Arc::new(failed_tx);
        let budget = Arc::new(Semaphore::new(BUFFER_BYTES));
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
            deadline,
            budget: budget.clone(),
            failed: failed_tx.clone(),
        };
        tokio::spawn(task.run(rx));
        Self {
            tx,
            session_id,
            budget,
            failed,
            failed_tx,
            deadline,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Why the recorder failed, once it has: the session must end.
    pub fn failure(&self) -> Option<RecordError> {
        self.failed.borrow().clone()
    }

    /// Resolves when the recorder fails (never, for a healthy session).
    pub async fn failed(&self) -> RecordError {
        let mut rx = self.failed.clone();
        let got = rx.wait_for(Option::is_some).await.map(|e| e.clone());
        match got {
            Ok(Some(e)) => e,
            _ => stopped(),
        }
    }

    /// Queues an event (waits while the session's buffer is full).
    pub async fn record(&self, kind: ev::event::Kind) -> Result<(), RecordError> {
        self.record_all(vec![kind]).await
    }

    /// Queues events in order, in as few messages to the recorder as the
    /// buffer allows (a busy session hands over a batch instead of waking the
    /// recorder per event). Fails once the recorder has failed.
    pub async fn record_all(&self, kinds: Vec<ev::event::Kind>) -> Result<(), RecordError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let mut batches = self.batches(kinds);
        let last = batches.pop();
        for b in batches {
            self.send(b, None).await?;
        }
        match last {
            Some(b) => self.send(b, None).await,
            None => Ok(()),
        }
    }

    /// Flushes everything queued and waits until it is committed.
    pub async fn commit(&self) -> Result<(), RecordError> {
        self.commit_with(Vec::new()).await
    }

    /// Queues `kinds`, flushes everything queued and waits until it is
    /// committed.
    pub async fn commit_with(&self, kinds: Vec<ev::event::Kind>) -> Result<(), RecordError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let mut batches = self.batches(kinds);
        let last = batches.pop().unwrap_or(Batch {
            kinds: Vec::new(),
            bytes: 0,
        });
        for b in batches {
            self.send(b, None).await?;
        }
        let (reply, rx) = oneshot::channel();
        self.send(last, Some(reply)).await?;
        self.answer(rx).await
    }

    /// Records `session_closed` and the session's end, and waits for commit.
    pub async fn close(&self, end: pb::SessionEnd) -> Result<(), RecordError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Close(end, reply))
            .await
            .map_err(|_| self.gone())?;
        self.answer(rx).await
    }

    /// Splits events into pieces of at most [`MAX_EVENT_DATA`] and groups
    /// them into batches that each fit the buffer several times over.
    fn batches(&self, kinds: Vec<ev::event::Kind>) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut cur = Batch {
            kinds: Vec::new(),
            bytes: 0,
        };
        for kind in kinds {
            for piece in split_event(kind) {
                let n = held_bytes(&piece);
                if cur.bytes + n > BUFFER_BYTES / 4 && !cur.kinds.is_empty() {
                    out.push(std::mem::replace(
                        &mut cur,
                        Batch {
                            kinds: Vec::new(),
                            bytes: 0,
                        },
                    ));
                }
                cur.bytes += n;
                cur.kinds.push((piece, n));
            }
        }
        if !cur.kinds.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Takes room in the buffer for `b` (waiting at most the deadline, or
    /// until the recorder fails), then hands it over.
    async fn send(
        &self,
        b: Batch,
        reply: Option<oneshot::Sender<Result<(), RecordError>>>,
    ) -> Result<(), RecordError> {
        let room = async {
            let permits = self
                .budget
                .acquire_many(b.bytes as u32)
                .await
                .map_err(|_| self.gone())?;
            permits.forget();
            let msg = match reply {
                Some(r) => Msg::Commit(b, r),
                None => Msg::Events(b),
            };
            self.tx.send(msg).await.map_err(|_| self.gone())
        };
        tokio::select! {
            r = tokio::time::timeout(self.deadline, room) => match r {
                Ok(r) => r,
                Err(_) => {
                    let e = RecordError::Commit(format!(
                        "the session's evidence buffer stayed full for {} s",
                        self.deadline.as_secs()
                    ));
                    self.failed_tx.send_if_modified(|f| {
                        if f.is_none() {
                            *f = Some(e.clone());
                            true
                        } else {
                            false
                        }
                    });
                    Err(self.failure().unwrap_or(e))
                }
            },
            e = self.failed() => Err(e),
        }
    }

    async fn answer(
        &self,
        rx: oneshot::Receiver<Result<(), RecordError>>,
    ) -> Result<(), RecordError> {
        rx.await.map_err(|_| self.gone())?
    }

    /// The recorder's failure, or that it stopped.
    fn gone(&self) -> RecordError {
        self.failure().unwrap_or_else(stopped)
    }
}

fn stopped() -> RecordError {
    RecordError::Stopped("recorder gone".into())
}

/// A built chunk, kept until it commits so a retry proposes the same bytes
/// under the same key.
struct Pending {
    cmd: Command,
    key: String,
    sha256: [u8; 32],
    /// Buffer bytes its events hold, returned once it commits.
    held: usize,
}

/// A buffered event.
struct Buffered {
    event: ev::Event,
    /// Buffer bytes it holds (0 for the recorder's own events).
    held: usize,
    /// About its encoded size.
    size: usize,
}

/// Why recording stopped, and the chunk that was being proposed.
type Failure = (RecordError, Option<Pending>);

struct Task<E: Engine> {
    node: NodeHandle<E>,
    session_id: String,
    summary: Option<pb::SessionSummary>,
    seq: u64,
    index: u64,
    prev: [u8; 32],
    /// Buffered events with the buffer bytes each holds (0 for the
    /// recorder's own) and its size.
    buf: Vec<Buffered>,
    buf_bytes: usize,
    oldest: Option<Instant>,
    deadline: Duration,
    budget: Arc<Semaphore>,
    failed: Arc<watch::Sender<Option<RecordError>>>,
}

impl<E: Engine> Task<E> {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let (error, pending) = loop {
            // A caller that waited too long for room failed the session.
            if let Some(e) = self.failed.borrow().clone() {
                break (e, None);
            }
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
                    match self.flush(None).await {
                        Ok(()) => continue,
                        Err(f) => break f,
                    }
                }
            };
            let closing = match msg {
                Some(Msg::Events(b)) => match self.push_all(b).await {
                    Ok(()) => continue,
                    Err(f) => break f,
                },
                Some(Msg::Commit(b, reply)) => {
                    let r = match self.push_all(b).await {
                        Ok(()) => self.flush(None).await,
                        Err(f) => Err(f),
                    };
                    let _ = reply.send(r.as_ref().map(|_| ()).map_err(|f| f.0.clone()));
                    match r {
                        Ok(()) => continue,
                        Err(f) => break f,
                    }
                }
                Some(Msg::Close(end, reply)) => Some((end, reply)),
                None => None,
            };
            // Dropped without close: still end the chain.
            let (end, reply) = match closing {
                Some((end, reply)) => (end, Some(reply)),
                None => (
                    pb::SessionEnd {
                        closed_at_ms: now_ms(),
                        reason: "the session ended without closing its recorder".into(),
                        ..Default::default()
                    },
                    None,
                ),
            };
            self.push_own(ev::event::Kind::Closed(ev::SessionClosed {
                reason: end.reason.clone(),
            }));
            let r = self.flush(Some(end)).await;
            if let Some(reply) = reply {
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|f| f.0.clone()));
            }
            match r {
                Ok(()) => return,
                Err(f) => break f,
            }
        };
        self.fail(error, pending, rx).await;
    }

    /// After a failure: refuse everything new, keep what was accepted, and
    /// record it and the session's end once the cluster takes writes again.
    async fn fail(
        mut self,
        error: RecordError,
        pending: Option<Pending>,
        mut rx: mpsc::Receiver<Msg>,
    ) {
        self.failed.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(error.clone());
                true
            } else {
                false
            }
        });
        let error = self.failed.borrow().clone().unwrap_or(error);
        tracing::error!(session = %self.session_id, error = %error, "evidence recording failed; the session ends");
        rx.close();
        // What was handed over before the failure was accepted (and may have
        // been relayed): it is recorded too, nothing after it.
        while let Some(m) = rx.recv().await {
            match m {
                Msg::Events(b) => self.buffer(b),
                Msg::Commit(b, reply) => {
                    self.buffer(b);
                    let _ = reply.send(Err(error.clone()));
                }
                Msg::Close(_, reply) => {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        let reason = match &error {
            RecordError::Commit(why) => format!("evidence could not be committed: {why}"),
            e => e.to_string(),
        };
        self.push_own(ev::event::Kind::Closed(ev::SessionClosed {
            reason: reason.clone(),
        }));
        let end = pb::SessionEnd {
            closed_at_ms: now_ms(),
            exit_code: -1,
            reason,
            ..Default::default()
        };
        // Without a deadline: until the cluster takes writes again.
        let mut next = pending;
        loop {
            if let Some(p) = next.take() {
                if let Err((e, _)) = self.propose(p, None).await {
                    tracing::error!(session = %self.session_id, error = %e, "could not record the end of the session");
                    return;
                }
            }
            if self.buf.is_empty() {
                break;
            }
            let events = self.cut();
            let last = self.buf.is_empty();
            match self.build(events, last.then(|| end.clone())) {
                Ok(p) => next = Some(p),
                Err(e) => {
                    tracing::error!(session = %self.session_id, error = %e, "could not record the end of the session");
                    return;
                }
            }
        }
        tracing::info!(session = %self.session_id, "recorded the end of a session whose evidence had failed");
    }

    /// Buffers a batch without flushing.
    fn buffer(&mut self, b: Batch) {
        for (kind, held) in b.kinds {
            self.push(kind, held, held);
        }
    }

    /// Buffers events in order, flushing whenever a chunk is full.
    async fn push_all(&mut self, b: Batch) -> Result<(), Failure> {
        for (kind, held) in b.kinds {
            self.push(kind, held, held);
            if self.buf_bytes >= CHUNK_BYTES {
                self.flush(None).await?;
            }
        }
        Ok(())
    }

    /// Buffers one of the recorder's own events (it holds no budget).
    fn push_own(&mut self, kind: ev::event::Kind) {
        let size = held_bytes(&kind);
        self.push(kind, 0, size);
    }

    fn push(&mut self, kind: ev::event::Kind, held: usize, size: usize) {
        let event = ev::Event {
            version: 1,
            session_id: self.session_id.clone(),
            seq: self.seq,
            at_ms: now_ms(),
            node_id: self.node.id(),
            kind: Some(kind),
        };
        self.seq += 1;
        self.buf_bytes += size;
        self.buf.push(Buffered { event, held, size });
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Takes the buffered events of one chunk: about [`CHUNK_BYTES`], at
    /// least one event.
    fn cut(&mut self) -> Vec<Buffered> {
        let mut n = 0;
        let mut bytes = 0;
        for b in &self.buf {
            if n > 0 && bytes + b.size > CHUNK_BYTES + MAX_EVENT_DATA {
                break;
            }
            bytes += b.size;
            n += 1;
        }
        let rest = self.buf.split_off(n);
        self.buf_bytes -= bytes;
        if rest.is_empty() {
            self.oldest = None;
        }
        std::mem::replace(&mut self.buf, rest)
    }

    /// Proposes the buffered events, a chunk at a time, each until it
    /// commits or the deadline passes.
    async fn flush(&mut self, end: Option<pb::SessionEnd>) -> Result<(), Failure> {
        while !self.buf.is_empty() {
            let events = self.cut();
            let last = self.buf.is_empty();
            let p = self
                .build(events, if last { end.clone() } else { None })
                .map_err(|e| (e, None))?;
            self.propose(p, Some(Instant::now() + self.deadline))
                .await?;
        }
        Ok(())
    }

    fn build(
        &mut self,
        events: Vec<Buffered>,
        end: Option<pb::SessionEnd>,
    ) -> Result<Pending, RecordError> {
        let held = events.iter().map(|b| b.held).sum();
        let events = events.into_iter().map(|b| b.event).collect();
        let chunk = build_chunk(self.index, self.prev, events)
            .map_err(|e| RecordError::Commit(e.to_string()))?;
        let sha256 = chunk_hash(&chunk);
        let cmd = Command::Evidence(Box::new(AppendChunk {
            chunk: chunk.encode_to_vec(),
            sha256,
            open: if self.index == 0 {
                self.summary.clone()
            } else {
                None
            },
            end,
        }));
        Ok(Pending {
            cmd,
            key: format!("{}/{}", self.session_id, self.index),
            sha256,
            held,
        })
    }

    /// Proposes `p`, retrying with the same key until `deadline` (`None`:
    /// until it commits); on failure hands it back, so that the background
    /// retry proposes the very same chunk.
    async fn propose(&mut self, p: Pending, deadline: Option<Instant>) -> Result<(), Failure> {
        let mut backoff = Duration::from_millis(20);
        loop {
            match self.node.propose(p.cmd.clone(), Some(p.key.clone())).await {
                Ok(o) => {
                    if let Some(why) = o.rejected {
                        return Err((RecordError::Commit(why), None));
                    }
                    self.committed(&p);
                    return Ok(());
                }
                Err(e)
                    if retryable(&e) && deadline.is_none_or(|d| Instant::now() + backoff < d) =>
                {
                    tracing::debug!(session = %self.session_id, error = %e, "evidence chunk: retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) if retryable(&e) => {
                    let why = format!("{e} (retried for {} s)", self.deadline.as_secs());
                    return Err((RecordError::Commit(why), Some(p)));
                }
                Err(e) => return Err((RecordError::Commit(e.to_string()), None)),
            }
        }
    }

    fn committed(&mut self, p: &Pending) {
        self.index += 1;
        self.prev = p.sha256;
        self.budget.add_permits(p.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::node::tests::{cluster, leader};
    use custody_proto::chain::{open_chunk, MAX_RAW_CHUNK};

    fn output(data: Vec<u8>) -> ev::event::Kind {
        ev::event::Kind::Output(ev::Output {
            stream: "stdout".into(),
            data: data.into(),
            truncated: false,
            continued: false,
        })
    }

    fn summary(id: &str) -> pb::SessionSummary {
        pb::SessionSummary {
            session_id: id.into(),
            resource: "r".into(),
            ..Default::default()
        }
    }

    fn stored(node: &NodeHandle<crate::storage::MemEngine>, id: &str) -> Vec<ev::Event> {
        let mut events = Vec::new();
        for raw in crate::state::evidence::session_chunks(node.store(), id).unwrap() {
            let c = ev::Chunk::decode(&raw[..]).unwrap();
            assert!(c.raw_len as usize <= CHUNK_BYTES + 2 * MAX_EVENT_DATA);
            assert!((c.raw_len as usize) < MAX_RAW_CHUNK);
            events.extend(open_chunk(&c).unwrap());
        }
        events
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_events_are_split_into_readable_chunks() {
        let (nodes, _net) = cluster(3, 10_000).await;
        let l = leader(&nodes).await;
        let node = nodes.iter().find(|n| n.id() == l).unwrap().clone();
        let rec = SessionRecorder::start(node.clone(), summary("big"));
        let data: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        rec.record(output(data.clone())).await.unwrap();
        rec.close(pb::SessionEnd::default()).await.unwrap();
        let events = stored(&node, "big");
        let mut joined = Vec::new();
        for e in &events {
            if let Some(ev::event::Kind::Output(o)) = &e.kind {
                assert!(o.data.len() <= MAX_EVENT_DATA);
                joined.extend_from_slice(&o.data);
            }
        }
        assert_eq!(joined, data);
        let rec = crate::state::evidence::session_get(node.store(), "big")
            .unwrap()
            .unwrap();
        assert!(rec.closed);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_is_recorded_or_ended_and_its_end_recorded_later() {
        let (nodes, net) = cluster(3, 10_000).await;
        let l = leader(&nodes).await;
        let node = nodes.iter().find(|n| n.id() == l).unwrap().clone();
        let rec = Arc::new(SessionRecorder::start_with(
            node.clone(),
            summary("s1"),
            Duration::from_secs(1),
        ));
        rec.record(output(b"before".to_vec())).await.unwrap();
        rec.commit().await.unwrap();
        // No node can reach another: nothing commits.
        net.lock().unwrap().1.extend([1, 2, 3]);
        // The data path is held once the buffer is full, and accepts no
        // more than the buffer holds.
        let flood = {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut accepted = 0usize;
                while rec.record(output(vec![b'f'; 64 << 10])).await.is_ok() {
                    accepted += 64 << 10;
                }
                accepted
            })
        };
        let e = tokio::time::timeout(Duration::from_secs(30), rec.failed())
            .await
            .expect("the recorder fails after its deadline");
        assert!(matches!(e, RecordError::Commit(_)), "{e}");
        let accepted = flood.await.unwrap();
        assert!(
            accepted <= BUFFER_BYTES,
            "accepted {accepted} bytes with nothing committing"
        );
        assert!(rec.record(output(b"after".to_vec())).await.is_err());
        assert!(rec.commit().await.is_err());
        assert!(rec.close(pb::SessionEnd::default()).await.is_err());
        // The cluster comes back: what was accepted, then the end, is recorded.
        net.lock().unwrap().1.clear();
        let mut closed = None;
        for _ in 0..1000 {
            if let Some(r) = crate::state::evidence::session_get(node.store(), "s1").unwrap() {
                if r.closed {
                    closed = Some(r);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = closed.expect("the session's end is recorded once the cluster is back");
        assert!(
            r.end
                .unwrap()
                .reason
                .contains("evidence could not be committed"),
            "the end says why"
        );
        let events = stored(&node, "s1");
        let outputs: Vec<Vec<u8>> = events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(ev::event::Kind::Output(o)) => Some(o.data.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(outputs[0], b"before");
        assert_eq!(
            outputs[1..].iter().map(Vec::len).sum::<usize>(),
            accepted,
            "every accepted event is recorded, none after"
        );
        assert!(matches!(
            events.last().unwrap().kind,
            Some(ev::event::Kind::Closed(_))
        ));
    }
}
