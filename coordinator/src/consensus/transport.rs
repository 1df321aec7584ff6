//! Raft transport over tonic gRPC with mutual TLS.
//!
//! Outbound: one task per peer keeps a client stream open and sends message
//! batches; snapshots go over their own streamed call, read from a pinned
//! view of the state by a blocking task (see [`super::snapshot`]). A peer's certificate
//! must name that exact node (`node-<id>.cluster.custody`).
//!
//! Inbound: [`RaftService`] checks that the caller's certificate is a node
//! certificate, that every message claims to come from that node and is
//! addressed to this one, and feeds the messages to the Raft loop. A snapshot
//! is staged on disk as it arrives and reaches the Raft loop only when whole.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use raft::eraftpb::Message;
use raft::SnapshotStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::tls::TlsMaterial;
use tonic::{Request, Response, Status, Streaming};

use custody_proto::cluster::v1::raft_transport_client::RaftTransportClient;
use custody_proto::cluster::v1::raft_transport_server::RaftTransport;
use custody_proto::cluster::v1::{snapshot_frame, RaftBatch, SendAck, SnapshotFrame};

use crate::storage::{decode_snapshot_ref, SnapshotIo};

use crate::pki::node_dns_name;
use crate::state::Member;
use crate::tls::node_id_from_cert;

use super::node::{decode_message, encode_message, is_snapshot, Input, Transport};

/// Largest gRPC message accepted or sent between nodes.
pub const MAX_FRAME_BYTES: usize = 64 << 20;
const BATCH_BYTES: usize = 8 << 20;
/// Snapshot frames buffered between the reading task and the stream.
const SNAPSHOT_FRAMES_AHEAD: usize = 4;
/// HTTP/2 flow-control window: large enough that 64 KiB entries stream
/// without waiting for window updates.
pub const WINDOW_BYTES: u32 = 16 << 20;

struct Peer {
    addr: String,
    tx: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

/// Sends Raft messages to peers over gRPC.
pub struct GrpcTransport {
    my_id: u64,
    tls: TlsMaterial,
    source_ip: Option<IpAddr>,
    input: mpsc::Sender<Input>,
    snapshots: std::sync::Arc<dyn SnapshotIo>,
    rt: tokio::runtime::Handle,
    peers: HashMap<u64, Peer>,
}

impl GrpcTransport {
    /// `input` is the node's input channel, used to report unreachable peers and
    /// snapshot results; `snapshots` is the node's store, which holds the
    /// views behind outgoing snapshots. Outgoing connections bind to
    /// `source_ip` when given. Must be created inside a tokio runtime.
    pub fn new(
        my_id: u64,
        tls: TlsMaterial,
        source_ip: Option<IpAddr>,
        input: mpsc::Sender<Input>,
        snapshots: std::sync::Arc<dyn SnapshotIo>,
    ) -> Self {
        Self {
            my_id,
            tls,
            source_ip,
            input,
            snapshots,
            rt: tokio::runtime::Handle::current(),
            peers: HashMap::new(),
        }
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        for p in self.peers.values() {
            p.task.abort();
        }
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            match self.peers.get(&m.to) {
                // A full queue means the peer is slow or gone; Raft resends.
                Some(p) => {
                    let _ = p.tx.try_send(m);
                }
                None => tracing::debug!(to = m.to, "no address for raft peer; message dropped"),
            }
        }
    }

    fn set_members(&mut self, members: &[Member]) {
        let wanted: HashMap<u64, &Member> = members
            .iter()
            .filter(|m| m.id != self.my_id)
            .map(|m| (m.id, m))
            .collect();
        self.peers.retain(|id, p| {
            let keep = wanted.get(id).is_some_and(|m| m.raft_addr == p.addr);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (id, m) in wanted {
            if self.peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(4096);
            let task = self.rt.spawn(peer_loop(
                id,
                m.raft_addr.clone(),
                self.tls.clone(),
                self.source_ip,
                rx,
                self.input.clone(),
                self.snapshots.clone(),
            ));
            self.peers.insert(
                id,
                Peer {
                    addr: m.raft_addr.clone(),
                    tx,
                    task,
                },
            );
        }
    }
}

async fn connect(
    peer: u64,
    addr: &str,
    tls: ClientTlsConfig,
    source_ip: Option<IpAddr>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls.domain_name(node_dns_name(peer)))?
        .local_address(source_ip)
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * WINDOW_BYTES))
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect()
        .await
}

async fn peer_loop(
    peer: u64,
    addr: String,
    tls: TlsMaterial,
    source_ip: Option<IpAddr>,
    mut rx: mpsc::Receiver<Message>,
    input: mpsc::Sender<Input>,
    snapshots: std::sync::Arc<dyn SnapshotIo>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let Some(first) = rx.recv().await else { return };
        // The node's certificate as it is now: a renewed one is used from
        // the next connection on.
        let channel = match connect(peer, &addr, tls.client_config(), source_ip).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(peer, %addr, error = %e, source = ?std::error::Error::source(&e), failures, "cannot reach raft peer");
                }
                if is_snapshot(&first) {
                    let _ = input
                        .send(Input::SnapshotStatus(peer, SnapshotStatus::Failure))
                        .await;
                }
                let _ = input.send(Input::Unreachable(peer)).await;
                // Drop what queued up while the peer was away; Raft resends.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(peer, %addr, "raft peer reachable again");
        }
        failures = 0;
        backoff = Duration::from_millis(50);
        let mut client = RaftTransportClient::new(channel.clone())
            .max_decoding_message_size(MAX_FRAME_BYTES)
            .max_encoding_message_size(MAX_FRAME_BYTES);
        let (stx, srx) = mpsc::channel::<RaftBatch>(16);
        let call = tokio::spawn(async move { client.send(ReceiverStream::new(srx)).await });
        let mut next = Some(first);
        loop {
            let m = match next.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => {
                        call.abort();
                        return;
                    }
                },
            };
            if is_snapshot(&m) {
                tokio::spawn(send_snapshot(
                    peer,
                    channel.clone(),
                    m,
                    input.clone(),
                    snapshots.clone(),
                ));
                continue;
            }
            let first = encode_message(&m);
            let mut size = first.len();
            let mut messages = vec![Bytes::from(first)];
            while size < BATCH_BYTES && messages.len() < 512 {
                match rx.try_recv() {
                    Ok(m) if is_snapshot(&m) => {
                        next = Some(m);
                        break;
                    }
                    Ok(m) => {
                        let b = encode_message(&m);
                        size += b.len();
                        messages.push(Bytes::from(b));
                    }
                    Err(_) => break,
                }
            }
            if stx.send(RaftBatch { messages }).await.is_err() {
                break;
            }
        }
        match call.await {
            Ok(Err(status)) => {
                tracing::warn!(peer, %addr, code = ?status.code(), message = status.message(), "raft stream to peer ended")
            }
            Ok(Ok(_)) | Err(_) => tracing::debug!(peer, %addr, "raft stream to peer ended"),
        }
        let _ = input.send(Input::Unreachable(peer)).await;
    }
}

async fn send_snapshot(
    peer: u64,
    channel: tonic::transport::Channel,
    m: Message,
    input: mpsc::Sender<Input>,
    snapshots: std::sync::Arc<dyn SnapshotIo>,
) {
    let index = m.get_snapshot().get_metadata().index;
    let view = decode_snapshot_ref(&m.get_snapshot().data)
        .ok()
        .and_then(|id| snapshots.take_outgoing(id));
    let Some(view) = view else {
        tracing::warn!(peer, index, "snapshot view expired before it was sent");
        let _ = input
            .send(Input::SnapshotStatus(peer, SnapshotStatus::Failure))
            .await;
        return;
    };
    let (tx, rx) = mpsc::channel(SNAPSHOT_FRAMES_AHEAD);
    let reader = tokio::task::spawn_blocking(move || {
        let mut out = super::snapshot::Outgoing::new(view, encode_message(&m));
        loop {
            match out.next_frame() {
                Ok(Some(f)) => {
                    if tx.blocking_send(f).is_err() {
                        return Err("the stream to the peer closed".to_string());
                    }
                }
                Ok(None) => return Ok(out.totals()),
                // Dropping `tx` without a done frame makes the receiver refuse it.
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    let mut client = RaftTransportClient::new(channel)
        .max_decoding_message_size(MAX_FRAME_BYTES)
        .max_encoding_message_size(MAX_FRAME_BYTES);
    let sent = client.send_snapshot(ReceiverStream::new(rx)).await;
    let read = reader
        .await
        .unwrap_or_else(|e| Err(format!("snapshot reader: {e}")));
    let status = match (sent, read) {
        (Ok(_), Ok((pairs, bytes))) => {
            tracing::info!(peer, index, pairs, bytes, "sent snapshot");
            SnapshotStatus::Finish
        }
        (Err(e), _) => {
            tracing::warn!(peer, index, error = %e, "sending snapshot failed");
            SnapshotStatus::Failure
        }
        (Ok(_), Err(e)) => {
            tracing::warn!(peer, index, error = %e, "reading snapshot failed");
            SnapshotStatus::Failure
        }
    };
    let _ = input.send(Input::SnapshotStatus(peer, status)).await;
}

/// Whether a node id is a current member of the cluster (as this node
/// knows it). Node certificates alone are no licence: a certificate for a
/// node that was never added, or was removed, is refused.
pub type MemberCheck = std::sync::Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// The members a node knows: its configuration's voters and learners
/// (joint ones included), or `seeds` (its config file's peers) while it has
/// no configuration yet.
pub fn member_check<E: crate::storage::Engine>(
    store: crate::storage::RaftStore<E>,
    seeds: Vec<u64>,
) -> MemberCheck {
    std::sync::Arc::new(move |id| {
        let cs = store.conf_state();
        if cs.voters.is_empty() && cs.learners.is_empty() {
            return seeds.contains(&id);
        }
        cs.voters.contains(&id)
            || cs.learners.contains(&id)
            || cs.voters_outgoing.contains(&id)
            || cs.learners_next.contains(&id)
    })
}

/// Refuses a caller that is not a current member.
pub fn require_member(is_member: &MemberCheck, id: u64) -> Result<(), Status> {
    if is_member(id) {
        Ok(())
    } else {
        tracing::warn!(target: "audit", event = "non_member_refused", node = id, "a node certificate of a non-member was refused");
        Err(Status::permission_denied(format!(
            "node {id} is not a member of this cluster"
        )))
    }
}

/// The inbound side of the transport.
pub struct RaftService {
    node_id: u64,
    input: mpsc::Sender<Input>,
    snapshots: std::sync::Arc<dyn SnapshotIo>,
    is_member: MemberCheck,
}

impl RaftService {
    /// `snapshots` is the node's store: received snapshots are staged in it.
    pub fn new(
        node_id: u64,
        input: mpsc::Sender<Input>,
        snapshots: std::sync::Arc<dyn SnapshotIo>,
        is_member: MemberCheck,
    ) -> Self {
        Self {
            node_id,
            input,
            snapshots,
            is_member,
        }
    }

    fn check(&self, m: &Message, peer: u64) -> Result<(), Status> {
        if m.from != peer {
            return Err(Status::permission_denied(format!(
                "message claims to come from node {} but the certificate names node {peer}",
                m.from
            )));
        }
        if m.to != self.node_id {
            return Err(Status::invalid_argument(format!(
                "message addressed to node {}, this is node {}",
                m.to, self.node_id
            )));
        }
        Ok(())
    }

    async fn deliver(&self, m: Message) -> Result<(), Status> {
        self.input
            .send(Input::Step(Box::new(m)))
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))
    }
}

fn peer_node_id<T>(req: &Request<T>) -> Result<u64, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    node_id_from_cert(leaf.as_ref()).ok_or_else(|| {
        Status::permission_denied("client certificate is not a cluster node certificate")
    })
}

fn snapshot_status(e: super::snapshot::SnapshotError) -> Status {
    match e {
        super::snapshot::SnapshotError::Malformed(_) => Status::invalid_argument(e.to_string()),
        super::snapshot::SnapshotError::Storage(_) => Status::internal(e.to_string()),
    }
}

fn malformed(e: String) -> Status {
    Status::invalid_argument(format!("malformed raft message: {e}"))
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn send(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<SendAck>, Status> {
        let peer = peer_node_id(&req)?;
        require_member(&self.is_member, peer)?;
        let mut stream = req.into_inner();
        while let Some(batch) = stream.message().await? {
            // A member removed while its stream was open.
            require_member(&self.is_member, peer)?;
            for b in batch.messages {
                let m = decode_message(&b).map_err(malformed)?;
                if is_snapshot(&m) {
                    return Err(Status::invalid_argument(
                        "snapshots must use the SendSnapshot call",
                    ));
                }
                self.check(&m, peer)?;
                self.deliver(m).await?;
            }
        }
        Ok(Response::new(SendAck {}))
    }

    async fn send_snapshot(
        &self,
        req: Request<Streaming<SnapshotFrame>>,
    ) -> Result<Response<SendAck>, Status> {
        let peer = peer_node_id(&req)?;
        require_member(&self.is_member, peer)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(SnapshotFrame {
                frame: Some(snapshot_frame::Frame::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "snapshot stream must start with a header",
                ))
            }
        };
        let mut m = decode_message(&header).map_err(malformed)?;
        if !is_snapshot(&m) {
            return Err(Status::invalid_argument(
                "snapshot header is not a snapshot message",
            ));
        }
        self.check(&m, peer)?;
        let snapshots = self.snapshots.clone();
        let image = tokio::task::spawn_blocking(move || snapshots.begin_incoming())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot stage a snapshot: {e}")))?;
        let mut rx = super::snapshot::Receiving::new(image);
        while let Some(f) = stream.message().await? {
            // Staging writes to disk: off the async workers.
            let (back, pushed) = tokio::task::spawn_blocking(move || {
                let r = rx.push(f);
                (rx, r)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            rx = back;
            pushed.map_err(snapshot_status)?;
        }
        let (pairs, bytes) = rx.totals();
        let m = tokio::task::spawn_blocking(move || rx.finish(&mut m).map(|()| m))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(snapshot_status)?;
        tracing::info!(
            node = self.node_id,
            from = peer,
            pairs,
            bytes,
            "received snapshot"
        );
        self.deliver(m).await?;
        Ok(Response::new(SendAck {}))
    }
}
