//! The Raft driver: one loop owns the `RawNode` and the storage writes.
//!
//! The loop runs on its own OS thread because it blocks on fsync. Everything
//! reaches it through one bounded channel of [`Input`]s; callers hold a cheap
//! [`NodeHandle`]. Per Ready it: sends leader messages, installs a snapshot,
//! appends entries and hard state in one batch (synced when raft-rs says it
//! must be), then sends the persisted messages (votes, append acks), then
//! applies committed entries.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{broadcast, mpsc, oneshot};

use custody_proto::cluster::v1 as pb;

use crate::state::{self, ApplyOutcome, Command, Member, Proposal, StateEvent, StateTxn};
use crate::storage::{decode_snapshot_ref, Engine, RaftStore, StorageError};

use super::logger::raft_logger;

/// Tunables of the Raft loop. Defaults: 100 ms heartbeat, 1 s election timeout.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub tick: Duration,
    pub heartbeat_ticks: usize,
    pub election_ticks: usize,
    /// Compact the log once this many applied entries sit before the applied index.
    pub compact_threshold: u64,
    /// ... or once the entries applied since the last compaction hold this
    /// many bytes (evidence entries are large, so a count alone lets the log
    /// grow to gigabytes). A leader does not compact past what its live
    /// followers have, up to four times this.
    pub compact_bytes: u64,
    /// How long a proposal or read may wait before the caller gets an error.
    pub request_timeout: Duration,
    /// The state version this node applies ([`state::STATE_VERSION`]; tests
    /// model an older binary with a lower one).
    pub state_version: u32,
}

impl NodeConfig {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            tick: Duration::from_millis(100),
            heartbeat_ticks: 1,
            election_ticks: 10,
            compact_threshold: 10_000,
            compact_bytes: 64 << 20,
            request_timeout: Duration::from_secs(5),
            state_version: state::STATE_VERSION,
        }
    }
}

/// How long [`NodeHandle::propose_retrying`] keeps proposing through leader
/// changes: longer than an election.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(15);

/// Errors a caller of the node can see.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no leader is known right now; retry")]
    NoLeader,
    #[error(
        "leadership changed before the request committed; retry (idempotency keys make this safe)"
    )]
    LeaderChanged,
    #[error("request timed out waiting for the cluster")]
    Timeout,
    #[error("the node is shutting down")]
    Stopped,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("membership change rejected: {0}")]
    Membership(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A committed entry this node cannot apply (a newer version's): the
    /// node stops applying instead of skipping it and diverging.
    #[error("cannot apply entry {index}: {error}")]
    Apply { index: u64, error: String },
    /// The command needs a state version some voter does not support yet.
    #[error("the cluster is not upgraded for this yet: it needs state version {needs}, and some voter supports only {cluster}; upgrade every node first")]
    NotUpgraded { needs: u32, cluster: u32 },
}

/// Sends Raft messages to peers. Implemented over gRPC in production and over
/// channels in the in-memory harness.
pub trait Transport: Send + 'static {
    fn send(&mut self, msgs: Vec<Message>);
    /// Called at start and whenever membership changes.
    fn set_members(&mut self, members: &[Member]);
}

/// What the loop can be asked to do.
pub enum Input {
    Tick,
    Step(Box<Message>),
    Propose {
        command: Command,
        idempotency_key: Option<String>,
        /// The state version the entry needs.
        version: u32,
        reply: oneshot::Sender<Result<ApplyOutcome, NodeError>>,
    },
    ConfChange {
        change: ConfChangeV2,
        members: Vec<Member>,
        reply: oneshot::Sender<Result<ConfState, NodeError>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Unreachable(u64),
    SnapshotStatus(u64, SnapshotStatus),
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    /// Asks the leader to hand leadership to another voter.
    TransferLeader(u64),
    /// Stops the loop after the current batch.
    Shutdown,
}

/// Replication progress of one peer, as the leader sees it.
#[derive(Debug, Clone)]
pub struct PeerProgress {
    pub id: u64,
    pub match_index: u64,
    pub recent_active: bool,
}

/// A point-in-time view of the node.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub role: StateRole,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub members: Vec<Member>,
    /// Filled only on the leader.
    pub progress: Vec<PeerProgress>,
    /// The state version this node applies, the cluster's (the lowest among
    /// the voters), and what each member reported (0: nothing yet).
    pub state_version: u32,
    pub cluster_version: u32,
    pub member_versions: Vec<(u64, u32)>,
}

/// A cloneable handle to a running node.
pub struct NodeHandle<E: Engine> {
    id: u64,
    state_version: u32,
    tx: mpsc::Sender<Input>,
    store: RaftStore<E>,
    timeout: Duration,
    events: broadcast::Sender<StateEvent>,
    stats: std::sync::Arc<super::stats::NodeStats>,
}

impl<E: Engine> Clone for NodeHandle<E> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            state_version: self.state_version,
            tx: self.tx.clone(),
            store: self.store.clone(),
            timeout: self.timeout,
            events: self.events.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<E: Engine> NodeHandle<E> {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn store(&self) -> &RaftStore<E> {
        &self.store
    }

    /// Changes applied to local state that services react to (revocations,
    /// membership). Published after the change is durable locally. A lagging
    /// receiver must treat `Lagged` like [`StateEvent::Reset`].
    pub fn subscribe(&self) -> broadcast::Receiver<StateEvent> {
        self.events.subscribe()
    }

    /// The sender the transport uses to deliver messages.
    pub fn input(&self) -> mpsc::Sender<Input> {
        self.tx.clone()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Input,
    ) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NodeError::Stopped)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    /// Proposes a command and waits until this node has applied it. A
    /// command that needs a newer state version than every voter reported is
    /// refused here, so no voter meets an entry it cannot apply.
    pub async fn propose(
        &self,
        command: Command,
        idempotency_key: Option<String>,
    ) -> Result<ApplyOutcome, NodeError> {
        let needs = command.min_version();
        gate(&self.store, needs)?;
        self.propose_at_version(command, idempotency_key, needs)
            .await
    }

    async fn propose_at_version(
        &self,
        command: Command,
        idempotency_key: Option<String>,
        version: u32,
    ) -> Result<ApplyOutcome, NodeError> {
        let t0 = std::time::Instant::now();
        let out = self
            .call(|reply| Input::Propose {
                command,
                idempotency_key,
                version,
                reply,
            })
            .await;
        if out.is_ok() {
            self.stats
                .proposal_seconds
                .observe(t0.elapsed().as_secs_f64());
        }
        out
    }

    /// What this node counted (leader changes, proposal latency).
    pub fn stats(&self) -> &std::sync::Arc<super::stats::NodeStats> {
        &self.stats
    }

    /// Records the state version this node's binary supports, once per
    /// version (retried through leader changes).
    pub async fn report_version(&self) -> Result<(), NodeError> {
        if state::node_version(&self.store, self.id)? == self.state_version {
            return Ok(());
        }
        self.propose_retrying(
            Command::ReportVersion {
                node: self.id,
                version: self.state_version,
            },
            Some(format!("{}/{}", self.id, self.state_version)),
        )
        .await
        .map(|_| ())
    }

    /// Proposes a command under an idempotency key (`key`, or a fresh random
    /// one) and, while the cluster is between leaders or slow, proposes it
    /// again under the same key for up to [`RETRY_DEADLINE`]. The command
    /// therefore applies once: a retry of an entry that did commit returns
    /// that entry's outcome. Use this for every command a caller may not see
    /// the outcome of (everything but the recorder, which has its own loop).
    pub async fn propose_retrying(
        &self,
        command: Command,
        key: Option<String>,
    ) -> Result<ApplyOutcome, NodeError> {
        let key = key.unwrap_or_else(|| format!("r/{:032x}", rand::random::<u128>()));
        let deadline = Instant::now() + RETRY_DEADLINE;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.propose(command.clone(), Some(key.clone())).await {
                Err(NodeError::NoLeader | NodeError::LeaderChanged | NodeError::Timeout)
                    if Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// Waits until local state is at least as new as the leader's commit index at
    /// the time of the call (ReadIndex), so a following local read is linearizable.
    pub async fn read_index(&self) -> Result<u64, NodeError> {
        self.call(|reply| Input::ReadIndex { reply }).await
    }

    /// Proposes a membership change and waits until it is applied and the
    /// cluster has left any joint configuration.
    pub async fn change_membership(
        &self,
        change: ConfChangeV2,
        members: Vec<Member>,
    ) -> Result<ConfState, NodeError> {
        self.call(|reply| Input::ConfChange {
            change,
            members,
            reply,
        })
        .await
    }

    /// Asks this node, if it leads, to hand leadership to `to`. Returns at once.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), NodeError> {
        self.tx
            .send(Input::TransferLeader(to))
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Asks the loop to stop; returns at once.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Input::Shutdown).await;
    }

    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Status { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        let mut st = rx.await.map_err(|_| NodeError::Stopped)?;
        // State reads, here on the caller's task rather than in the Raft loop.
        // A read failure shows as 0 ("not known").
        st.cluster_version = state::cluster_version(&self.store).unwrap_or(0);
        st.member_versions = st
            .members
            .iter()
            .map(|m| (m.id, state::node_version(&self.store, m.id).unwrap_or(0)))
            .collect();
        Ok(st)
    }
}

/// Refuses a command that needs a newer state version than every voter has
/// reported.
fn gate<E: Engine>(store: &RaftStore<E>, needs: u32) -> Result<(), NodeError> {
    if needs <= 1 {
        return Ok(());
    }
    let cluster = state::cluster_version(store)?;
    if needs > cluster {
        return Err(NodeError::NotUpgraded { needs, cluster });
    }
    Ok(())
}

/// The loop's state.
struct Driver<E: Engine, T: Transport> {
    stats: std::sync::Arc<super::stats::NodeStats>,
    cfg: NodeConfig,
    raw: RawNode<RaftStore<E>>,
    store: RaftStore<E>,
    transport: T,
    rx: mpsc::Receiver<Input>,
    next_request: u64,
    pending: HashMap<u64, oneshot::Sender<Result<ApplyOutcome, NodeError>>>,
    pending_conf: HashMap<u64, oneshot::Sender<Result<ConfState, NodeError>>>,
    /// Conf changes applied in a joint state, waiting for the group to leave it.
    awaiting_leave_joint: Vec<oneshot::Sender<Result<ConfState, NodeError>>>,
    read_waiters: HashMap<u64, oneshot::Sender<Result<u64, NodeError>>>,
    /// Reads whose index is known, waiting for apply to reach it.
    ready_reads: Vec<(u64, oneshot::Sender<Result<u64, NodeError>>)>,
    members: BTreeMap<u64, Member>,
    leader: u64,
    events: broadcast::Sender<StateEvent>,
    /// Index and size of each entry applied since the last compaction (this
    /// process's only: after a restart the entry count still bounds the log).
    applied_sizes: std::collections::VecDeque<(u64, u64)>,
    applied_bytes: u64,
}

/// Builds the node and starts its loop on a new thread. `bootstrap` lists the
/// initial members when this node may start a new cluster; a node with no
/// state and no bootstrap list waits to be added and receive a snapshot.
///
/// `seed` gives peer addresses to use until the node knows the members from
/// its state (a joining node must answer the leader before its snapshot).
/// `make_transport` receives the node's input channel.
pub fn start<E: Engine, T: Transport>(
    cfg: NodeConfig,
    store: RaftStore<E>,
    bootstrap: Option<Vec<Member>>,
    seed: Vec<Member>,
    make_transport: impl FnOnce(mpsc::Sender<Input>) -> T,
) -> Result<(NodeHandle<E>, RaftThread), NodeError> {
    if !store.is_initialized() {
        if let Some(members) = bootstrap {
            let voters: Vec<u64> = members.iter().map(|m| m.id).collect();
            store.bootstrap(&voters, state::bootstrap_ops(&members))?;
            tracing::info!(node = cfg.id, ?voters, "bootstrapped a new cluster");
        } else {
            tracing::info!(
                node = cfg.id,
                "no state yet: waiting to be added to a cluster"
            );
        }
    }
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied: store.applied_index(),
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_cfg
        .validate()
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let raw = RawNode::new(&raft_cfg, store.clone(), &raft_logger(cfg.id))
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let members: BTreeMap<u64, Member> = state::load_members(&store)?
        .into_iter()
        .map(|m| (m.id, m))
        .collect();
    let (tx, rx) = mpsc::channel(16 * 1024);
    let mut transport = make_transport(tx.clone());
    if members.is_empty() {
        transport.set_members(&seed);
    } else {
        transport.set_members(&members.values().cloned().collect::<Vec<_>>());
    }
    let (events, _) = broadcast::channel(1024);
    let stats = std::sync::Arc::new(super::stats::NodeStats::default());
    let handle = NodeHandle {
        stats: stats.clone(),
        id: cfg.id,
        state_version: cfg.state_version,
        tx: tx.clone(),
        store: store.clone(),
        timeout: cfg.request_timeout,
        events: events.clone(),
    };
    let mut driver = Driver {
        stats,
        next_request: rand::random::<u64>() >> 1,
        cfg,
        raw,
        store,
        transport,
        rx,
        pending: HashMap::new(),
        pending_conf: HashMap::new(),
        awaiting_leave_joint: Vec::new(),
        read_waiters: HashMap::new(),
        ready_reads: Vec::new(),
        members,
        leader: 0,
        events,
        applied_sizes: Default::default(),
        applied_bytes: 0,
    };
    let id = driver.cfg.id;
    let thread = std::thread::Builder::new()
        .name(format!("raft-{id}"))
        .spawn(move || driver.run())
        .map_err(|e| NodeError::Invalid(format!("spawn raft thread: {e}")))?;
    Ok((handle, thread))
}

/// The Raft loop's thread. It ends with an error when storage failed: the
/// node can then make no safe progress, and its process should exit.
pub type RaftThread = std::thread::JoinHandle<Result<(), NodeError>>;

/// Spawns the ticker that drives Raft's logical clock. Runs until the node stops.
pub fn spawn_ticker(tx: mpsc::Sender<Input>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(every);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            iv.tick().await;
            match tx.try_send(Input::Tick) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    })
}

/// Wall-clock milliseconds since the epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<E: Engine, T: Transport> Driver<E, T> {
    fn run(&mut self) -> Result<(), NodeError> {
        let id = self.cfg.id;
        while let Some(first) = self.rx.blocking_recv() {
            let started = Instant::now();
            let mut stop = self.handle(first);
            // Batch whatever else is queued into the same Ready (one fsync).
            while !stop && started.elapsed() < Duration::from_millis(5) {
                match self.rx.try_recv() {
                    Ok(i) => stop = self.handle(i),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.on_ready() {
                // A storage failure leaves the node unable to make safe progress:
                // stop instead of acknowledging anything more.
                tracing::error!(node = id, error = %e, "raft loop stopped: storage failure");
                return Err(e);
            }
            if stop {
                break;
            }
        }
        tracing::info!(node = id, "raft loop stopped");
        Ok(())
    }

    /// Handles one input; returns true when the loop must stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Shutdown => return true,
            Input::Tick => {
                self.raw.tick();
                self.gc_waiters();
            }
            Input::Step(mut m) => {
                self.guard_lost_log(&mut m);
                if self.votes_withheld(&m) {
                    return false;
                }
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(node = self.cfg.id, error = %e, "dropped raft message");
                }
            }
            Input::Propose {
                command,
                idempotency_key,
                version,
                reply,
            } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(NodeError::NoLeader));
                    return false;
                }
                self.next_request += 1;
                let p = Proposal {
                    origin_node: self.cfg.id,
                    request_id: self.next_request,
                    idempotency_key,
                    proposed_at_ms: now_ms(),
                    command,
                    version,
                };
                match self.raw.propose(vec![], p.encode()) {
                    Ok(()) => {
                        self.pending.insert(p.request_id, reply);
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply.send(Err(NodeError::NoLeader));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Invalid(e.to_string())));
                    }
                }
            }
            Input::ConfChange {
                change,
                members,
                reply,
            } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(NodeError::Membership(format!(
                        "this node is not the leader (leader: {})",
                        self.raw.raft.leader_id
                    ))));
                    return false;
                }
                if self.raw.raft.has_pending_conf() {
                    let _ = reply.send(Err(NodeError::Membership(
                        "another membership change is still in progress".into(),
                    )));
                    return false;
                }
                self.next_request += 1;
                let ctx = pb::ConfChangeContext {
                    origin_node: self.cfg.id,
                    request_id: self.next_request,
                    members: members.iter().map(pb::Member::from).collect(),
                };
                match self.raw.propose_conf_change(ctx.encode_to_vec(), change) {
                    Ok(()) => {
                        self.pending_conf.insert(self.next_request, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Membership(e.to_string())));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(NodeError::NoLeader));
                    return false;
                }
                self.next_request += 1;
                let ctx = self.next_request.to_be_bytes().to_vec();
                self.read_waiters.insert(self.next_request, reply);
                self.raw.read_index(ctx);
            }
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::TransferLeader(to) => {
                if self.raw.raft.state == StateRole::Leader {
                    tracing::info!(node = self.cfg.id, to, "transferring leadership");
                    self.raw.transfer_leader(to);
                }
            }
            Input::SnapshotStatus(id, st) => self.raw.report_snapshot(id, st),
            Input::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
        false
    }

    /// Copes with a peer whose data dir was wiped and that restarted under its
    /// old id: its log is shorter than the leader believes.
    ///
    /// - As follower: a heartbeat may carry a commit index past our (new, short)
    ///   log; raft-rs would abort. The commit index is only a hint, so clamp it.
    /// - As leader: an append rejection whose hint is below the peer's recorded
    ///   match index means the peer lost entries. Reset its progress so it is
    ///   probed from scratch and sent a snapshot. Lowering a match index can only
    ///   delay commits, never undo one.
    fn guard_lost_log(&mut self, m: &mut Message) {
        match m.get_msg_type() {
            MessageType::MsgHeartbeat => {
                let last = self.raw.raft.raft_log.last_index();
                if m.commit > last {
                    m.commit = last;
                }
            }
            MessageType::MsgAppendResponse
                if m.reject && self.raw.raft.state == StateRole::Leader =>
            {
                let node = self.cfg.id;
                if let Some(pr) = self.raw.raft.mut_prs().get_mut(m.from) {
                    if m.reject_hint < pr.matched {
                        tracing::warn!(
                            node,
                            peer = m.from,
                            had = pr.matched,
                            now = m.reject_hint,
                            "peer lost log entries (wiped data dir?); resending from a snapshot"
                        );
                        pr.matched = 0;
                        pr.become_probe();
                    }
                }
            }
            _ => {}
        }
    }

    /// A node that holds no configuration yet (a joiner before its snapshot,
    /// or a member whose data dir was lost) answers no vote request: with no
    /// log it would vote for any candidate, and a candidate missing committed
    /// entries could win with its vote.
    fn votes_withheld(&self, m: &Message) -> bool {
        let vote = matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        );
        if !vote {
            return false;
        }
        let cs = self.store.conf_state();
        let empty = cs.voters.is_empty() && cs.learners.is_empty();
        if empty {
            tracing::debug!(
                node = self.cfg.id,
                candidate = m.from,
                "no state yet: not answering a vote request"
            );
        }
        empty
    }

    fn status(&self) -> NodeStatus {
        let r = &self.raw.raft;
        let cs = self.store.conf_state();
        let progress = if r.state == StateRole::Leader {
            r.prs()
                .iter()
                .map(|(id, p)| PeerProgress {
                    id: *id,
                    match_index: p.matched,
                    recent_active: p.recent_active || *id == self.cfg.id,
                })
                .collect()
        } else {
            Vec::new()
        };
        NodeStatus {
            id: self.cfg.id,
            leader_id: r.leader_id,
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.store.applied_index(),
            first_index: self.store.first_log_index(),
            role: r.state,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            members: self.members.values().cloned().collect(),
            progress,
            state_version: self.cfg.state_version,
            // Filled by `NodeHandle::status`, off the Raft thread.
            cluster_version: 0,
            member_versions: Vec::new(),
        }
    }

    /// Drops waiters whose callers gave up.
    fn gc_waiters(&mut self) {
        self.pending.retain(|_, r| !r.is_closed());
        self.pending_conf.retain(|_, r| !r.is_closed());
        self.read_waiters.retain(|_, r| !r.is_closed());
        self.ready_reads.retain(|(_, r)| !r.is_closed());
    }

    fn on_leader_change(&mut self, new_leader: u64) {
        if new_leader != 0 {
            self.stats.leader_changed();
        }
        tracing::info!(
            node = self.cfg.id,
            leader = new_leader,
            term = self.raw.raft.term,
            "leader changed"
        );
        // Proposals in flight under the old leader may never commit; tell callers
        // to retry now rather than time out. Retries carry the same idempotency key.
        for (_, r) in self.pending.drain() {
            let _ = r.send(Err(NodeError::LeaderChanged));
        }
        for (_, r) in self.read_waiters.drain() {
            let _ = r.send(Err(NodeError::LeaderChanged));
        }
        for (_, r) in self.pending_conf.drain() {
            let _ = r.send(Err(NodeError::LeaderChanged));
        }
    }

    fn on_ready(&mut self) -> Result<(), NodeError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            if ss.leader_id != self.leader {
                self.leader = ss.leader_id;
                self.on_leader_change(ss.leader_id);
            }
        }
        // Messages from a leader may go out before its own append is durable.
        let msgs = rd.take_messages();
        self.stats
            .snapshots_sent(msgs.iter().filter(|m| is_snapshot(m)).count() as u64);
        self.transport.send(msgs);

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let image = decode_snapshot_ref(&snap.data)?;
            self.store.install_snapshot(snap.get_metadata(), image)?;
            self.applied_sizes.clear();
            self.applied_bytes = 0;
            self.reload_members()?;
            let _ = self.events.send(StateEvent::Reset);
            tracing::info!(
                node = self.cfg.id,
                index = snap.get_metadata().index,
                "installed snapshot"
            );
        }

        let sync = rd.must_sync();
        self.store.append(rd.entries(), rd.hs(), sync)?;
        // The append is durable: votes and append acks may go out now, before
        // applying (which would only delay the leader's commit).
        self.transport.send(rd.take_persisted_messages());

        for rs in rd.take_read_states() {
            let Ok(ctx) = <[u8; 8]>::try_from(&rs.request_ctx[..]) else {
                continue;
            };
            if let Some(w) = self.read_waiters.remove(&u64::from_be_bytes(ctx)) {
                self.ready_reads.push((rs.index, w));
            }
        }

        let committed = rd.take_committed_entries();
        self.apply(committed)?;

        let mut light = self.raw.advance(rd);
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        let commit = light.commit_index();
        if committed.is_empty() {
            if let Some(c) = commit {
                // Keep the stored commit index fresh; not required for safety.
                let applied = self.store.applied_index();
                self.store.apply(vec![], applied, c, None)?;
            }
        } else {
            self.apply(committed)?;
        }
        self.raw.advance_apply();
        self.resolve_reads();
        self.maybe_compact()?;
        Ok(())
    }

    fn reload_members(&mut self) -> Result<(), NodeError> {
        self.members = state::load_members(&self.store)?
            .into_iter()
            .map(|m| (m.id, m))
            .collect();
        self.transport
            .set_members(&self.members.values().cloned().collect::<Vec<_>>());
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let last_index = last.index;
        let mut txn = StateTxn::new(&self.store);
        let mut replies = Vec::new();
        let mut conf_state = None;
        let mut members_changed = false;
        for e in entries {
            let size = (e.data.len() + e.context.len()) as u64;
            self.applied_sizes.push_back((e.index, size));
            self.applied_bytes += size;
            if e.data.is_empty() && e.get_entry_type() == EntryType::EntryNormal {
                continue; // the empty entry a new leader appends
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    match Proposal::decode_supporting(&e.data, self.cfg.state_version) {
                        Ok(p) => {
                            let outcome = txn.apply(e.index, &p)?;
                            if p.origin_node == self.cfg.id {
                                if let Some(r) = self.pending.remove(&p.request_id) {
                                    replies.push((r, outcome));
                                }
                            }
                        }
                        Err(err) => {
                            // Skipping it could diverge from nodes that can apply
                            // it (a newer binary): stop applying instead. Nothing
                            // of this batch is written, so once the node is
                            // upgraded it applies the batch from its start.
                            tracing::error!(node = self.cfg.id, index = e.index, error = %err, "cannot apply a committed entry; stopping (upgrade this node)");
                            return Err(NodeError::Apply {
                                index: e.index,
                                error: err.to_string(),
                            });
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    tracing::error!(
                        node = self.cfg.id,
                        index = e.index,
                        "skipping legacy conf change entry"
                    );
                }
                EntryType::EntryConfChangeV2 => {
                    let cs = self.apply_conf_change(&e, &mut txn)?;
                    members_changed = true;
                    conf_state = Some(cs);
                }
            }
        }
        let commit = self.raw.raft.raft_log.committed.max(last_index);
        let events = txn.take_events();
        self.store
            .apply(txn.into_ops(), last_index, commit, conf_state.as_ref())?;
        for (r, o) in replies {
            let _ = r.send(Ok(o));
        }
        if members_changed {
            self.reload_members()?;
            let _ = self.events.send(StateEvent::MembersChanged);
        }
        for ev in events {
            let _ = self.events.send(ev);
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        e: &Entry,
        txn: &mut StateTxn<E>,
    ) -> Result<ConfState, NodeError> {
        // Custody only proposes ConfChangeV2; a legacy entry cannot appear.
        let cc = ConfChangeV2::parse_from_bytes(&e.data)
            .map_err(|err| NodeError::Invalid(format!("conf change at {}: {err}", e.index)))?;
        let ctx = pb::ConfChangeContext::decode(&e.context[..]).unwrap_or_default();
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(err) => {
                // Rejected identically on every node; the state is unchanged.
                tracing::warn!(node = self.cfg.id, index = e.index, error = %err, "conf change rejected");
                if ctx.origin_node == self.cfg.id {
                    if let Some(r) = self.pending_conf.remove(&ctx.request_id) {
                        let _ = r.send(Err(NodeError::Membership(err.to_string())));
                    }
                }
                return Ok(self.raw.raft.prs().conf().to_conf_state());
            }
        };
        for m in &ctx.members {
            txn.put_member(&Member::from(m.clone()));
        }
        for ch in cc.get_changes() {
            if ch.get_change_type() == raft::eraftpb::ConfChangeType::RemoveNode {
                txn.remove_member(ch.node_id);
                if ch.node_id == self.cfg.id {
                    tracing::warn!(node = self.cfg.id, "this node was removed from the cluster");
                }
            }
        }
        tracing::info!(node = self.cfg.id, index = e.index, voters = ?cs.voters, outgoing = ?cs.voters_outgoing, learners = ?cs.learners, "applied membership change");
        if ctx.origin_node == self.cfg.id {
            if let Some(r) = self.pending_conf.remove(&ctx.request_id) {
                self.awaiting_leave_joint.push(r);
            }
        }
        if cs.voters_outgoing.is_empty() {
            for r in self.awaiting_leave_joint.drain(..) {
                let _ = r.send(Ok(cs.clone()));
            }
        }
        Ok(cs)
    }

    fn resolve_reads(&mut self) {
        let applied = self.store.applied_index();
        let mut i = 0;
        while i < self.ready_reads.len() {
            if self.ready_reads[i].0 <= applied {
                let (idx, r) = self.ready_reads.swap_remove(i);
                let _ = r.send(Ok(idx));
            } else {
                i += 1;
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let applied = self.store.applied_index();
        let first = self.store.first_log_index();
        if applied < first {
            return Ok(());
        }
        let by_count = applied - first + 1 >= self.cfg.compact_threshold;
        let by_bytes = self.applied_bytes >= self.cfg.compact_bytes;
        if !(by_count || by_bytes) {
            return Ok(());
        }
        // Keep a short tail (half of each threshold) so briefly lagging
        // followers catch up from the log.
        let keep_entries = self.cfg.compact_threshold / 2;
        let keep_bytes = self.cfg.compact_bytes / 2;
        let mut to = applied.saturating_sub(keep_entries);
        let mut kept = 0u64;
        for &(index, size) in self.applied_sizes.iter().rev() {
            if index <= to {
                break;
            }
            kept += size;
            if kept > keep_bytes {
                to = index;
                break;
            }
        }
        let mut to = to.min(applied);
        // A leader keeps what its live followers still need, so a follower a
        // few seconds behind catches up from the log rather than by a
        // snapshot of the whole state; past four times the byte threshold
        // the log is cut anyway.
        if self.raw.raft.state == StateRole::Leader
            && self.applied_bytes < self.cfg.compact_bytes.saturating_mul(4)
        {
            let floor = self
                .raw
                .raft
                .prs()
                .iter()
                .filter(|(id, p)| {
                    **id != self.cfg.id
                        && p.recent_active
                        && p.state != raft::ProgressState::Snapshot
                })
                .map(|(_, p)| p.matched)
                .min();
            if let Some(f) = floor {
                to = to.min(f);
            }
        }
        if to >= first {
            self.store.compact(to)?;
            tracing::debug!(node = self.cfg.id, to, "compacted raft log");
        }
        while self
            .applied_sizes
            .front()
            .is_some_and(|(i, _)| *i <= to.max(first - 1))
        {
            if let Some((_, size)) = self.applied_sizes.pop_front() {
                self.applied_bytes -= size;
            }
        }
        Ok(())
    }
}

/// Encodes a Raft message for the wire (rust-protobuf, as raft-rs defines it).
pub fn encode_message(m: &Message) -> Vec<u8> {
    m.write_to_bytes().unwrap_or_default()
}

/// Decodes a Raft message from the wire.
pub fn decode_message(b: &[u8]) -> Result<Message, String> {
    Message::parse_from_bytes(b).map_err(|e| e.to_string())
}

pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}

#[cfg(test)]
pub(crate) mod tests {
    //! An in-memory multi-node harness: real drivers over `MemEngine`, with a
    //! channel transport that can cut nodes off.

    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::storage::{MemEngine, SnapshotIo};

    /// The nodes' inputs, the ids cut off from everyone, and the nodes'
    /// stores (for snapshots).
    pub(crate) type Net = Arc<
        Mutex<(
            HashMap<u64, mpsc::Sender<Input>>,
            HashSet<u64>,
            HashMap<u64, Arc<dyn SnapshotIo>>,
        )>,
    >;

    pub(crate) fn new_net() -> Net {
        Arc::new(Mutex::new(Default::default()))
    }

    struct ChanTransport {
        id: u64,
        net: Net,
    }

    /// Streams a snapshot from one store to another in process, frame by
    /// frame as the gRPC transport does.
    fn transfer(from: &dyn SnapshotIo, to: &dyn SnapshotIo, mut m: Message) -> Option<Message> {
        let id = decode_snapshot_ref(&m.get_snapshot().data).ok()?;
        let mut out = super::super::snapshot::Outgoing::new(from.take_outgoing(id)?, vec![]);
        let mut rx = super::super::snapshot::Receiving::new(to.begin_incoming().ok()?);
        out.next_frame().ok()?; // the header
        while let Some(f) = out.next_frame().ok()? {
            rx.push(f).ok()?;
        }
        rx.finish(&mut m).ok()?;
        Some(m)
    }

    impl Transport for ChanTransport {
        fn send(&mut self, msgs: Vec<Message>) {
            let net = self.net.lock().unwrap();
            for m in msgs {
                if net.1.contains(&self.id) || net.1.contains(&m.to) {
                    continue; // cut off
                }
                let m = if is_snapshot(&m) {
                    match (net.2.get(&self.id), net.2.get(&m.to)) {
                        (Some(a), Some(b)) => match transfer(a.as_ref(), b.as_ref(), m) {
                            Some(m) => m,
                            None => continue,
                        },
                        _ => continue,
                    }
                } else {
                    m
                };
                if let Some(tx) = net.0.get(&m.to) {
                    let _ = tx.try_send(Input::Step(Box::new(m)));
                }
            }
        }
        fn set_members(&mut self, _: &[Member]) {}
    }

    fn members(n: u64) -> Vec<Member> {
        (1..=n)
            .map(|id| Member {
                id,
                region: "r".into(),
                raft_addr: format!("mem:{id}"),
                api_addr: format!("mem:{id}"),
                tunnel_addr: String::new(),
            })
            .collect()
    }

    pub(crate) async fn cluster(n: u64, compact: u64) -> (Vec<NodeHandle<MemEngine>>, Net) {
        let net = new_net();
        let mut nodes = Vec::new();
        for id in 1..=n {
            let mut cfg = NodeConfig::new(id);
            cfg.tick = Duration::from_millis(10);
            cfg.compact_threshold = compact;
            let store = RaftStore::open(MemEngine::new()).unwrap();
            net.lock().unwrap().2.insert(id, Arc::new(store.clone()));
            let net2 = net.clone();
            let (h, _thread) = start(cfg, store, Some(members(n)), members(n), move |_| {
                ChanTransport { id, net: net2 }
            })
            .unwrap();
            net.lock().unwrap().0.insert(id, h.input());
            spawn_ticker(h.input(), Duration::from_millis(10));
            nodes.push(h);
        }
        (nodes, net)
    }

    /// A one-node cluster over `engine`, leading.
    async fn single(cfg: NodeConfig, engine: MemEngine) -> (NodeHandle<MemEngine>, RaftThread) {
        let store = RaftStore::open(engine).unwrap();
        let (h, thread) = start(cfg, store, Some(members(1)), members(1), |_| {
            ChanTransport {
                id: 1,
                net: new_net(),
            }
        })
        .unwrap();
        spawn_ticker(h.input(), Duration::from_millis(10));
        leader(std::slice::from_ref(&h)).await;
        (h, thread)
    }

    pub(crate) async fn leader(nodes: &[NodeHandle<MemEngine>]) -> u64 {
        for _ in 0..500 {
            for n in nodes {
                let st = n.status().await.unwrap();
                if st.role == StateRole::Leader {
                    return st.id;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no leader");
    }

    async fn put_retrying(n: &NodeHandle<MemEngine>, key: &str, idem: &str) -> ApplyOutcome {
        for _ in 0..200 {
            match n
                .propose(Command::put(key, b"v".to_vec()).unwrap(), Some(idem.into()))
                .await
            {
                Ok(o) => return o,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        panic!("put {key} never succeeded");
    }

    /// A node with no state (here, one whose data dir was lost, restarted with
    /// no bootstrap) grants no vote; once it has state it answers as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_state_answers_no_vote_request() {
        struct Capture(Arc<Mutex<Vec<Message>>>);
        impl Transport for Capture {
            fn send(&mut self, msgs: Vec<Message>) {
                self.0.lock().unwrap().extend(msgs);
            }
            fn set_members(&mut self, _: &[Member]) {}
        }
        let vote = |from: u64, term: u64| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgRequestVote);
            m.from = from;
            m.to = 2;
            m.term = term;
            m.log_term = 1;
            m.index = 1;
            m
        };
        let answered = |sent: &Arc<Mutex<Vec<Message>>>| {
            sent.lock()
                .unwrap()
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgRequestVoteResponse)
        };
        for (bootstrapped, expect_answer) in [(false, false), (true, true)] {
            let sent = Arc::new(Mutex::new(Vec::new()));
            let store = RaftStore::open(MemEngine::new()).unwrap();
            let bootstrap = bootstrapped.then(|| members(3));
            let s2 = sent.clone();
            let (h, _thread) = start(
                NodeConfig::new(2),
                store,
                bootstrap,
                members(3),
                move |_| Capture(s2),
            )
            .unwrap();
            h.input()
                .send(Input::Step(Box::new(vote(1, 5))))
                .await
                .unwrap();
            for _ in 0..50 {
                if answered(&sent) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                answered(&sent),
                expect_answer,
                "bootstrapped {bootstrapped}: {:?}",
                sent.lock().unwrap()
            );
            h.shutdown().await;
        }
    }

    /// A keyed proposal made while the leader is cut off goes through once a
    /// new leader is elected, and applies once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_are_retried_across_a_leader_change_and_apply_once() {
        let (nodes, net) = cluster(3, 10_000).await;
        let l = leader(&nodes).await;
        let follower = nodes.iter().find(|n| n.id() != l).unwrap().clone();
        net.lock().unwrap().1.insert(l);
        let o = follower
            .propose_retrying(Command::put("once", b"v".to_vec()).unwrap(), None)
            .await
            .expect("retried through the election");
        let others: Vec<_> = nodes.iter().filter(|n| n.id() != l).cloned().collect();
        assert_ne!(leader(&others).await, l);
        net.lock().unwrap().1.clear();
        for n in &nodes {
            for _ in 0..300 {
                if n.store().applied_index() >= o.index {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let rec = state::kv_get(n.store(), "once").unwrap().unwrap();
            assert_eq!(rec.version, 1, "node {}", n.id());
        }
    }

    /// Mixed versions: node 3 runs an "older binary" (state version 1). The
    /// cluster version is then 1, so commands that need 2 are refused before
    /// they are proposed; and an entry that needs 2 anyway (proposed past
    /// the gate here) stops node 3's applying, while the others apply it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_node_stops_applying_what_it_cannot_read() {
        let net = new_net();
        let mut nodes = Vec::new();
        let mut threads = Vec::new();
        for id in 1..=3 {
            let mut cfg = NodeConfig::new(id);
            cfg.tick = Duration::from_millis(10);
            cfg.state_version = if id == 3 { 1 } else { 2 };
            let store = RaftStore::open(MemEngine::new()).unwrap();
            let net2 = net.clone();
            let (h, t) = start(cfg, store, Some(members(3)), members(3), move |_| {
                ChanTransport { id, net: net2 }
            })
            .unwrap();
            net.lock().unwrap().0.insert(id, h.input());
            spawn_ticker(h.input(), Duration::from_millis(10));
            nodes.push(h);
            threads.push(t);
        }
        let l = leader(&nodes).await;
        for n in &nodes {
            n.report_version().await.unwrap();
        }
        let lead = nodes.iter().find(|n| n.id() == l).unwrap().clone();
        let reported = put_retrying(&lead, "sync", "sync").await.index;
        for n in &nodes {
            for _ in 0..300 {
                if n.store().applied_index() >= reported {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(state::cluster_version(n.store()).unwrap(), 1);
        }
        assert!(matches!(
            gate(lead.store(), 2),
            Err(NodeError::NotUpgraded {
                needs: 2,
                cluster: 1
            })
        ));
        assert!(gate(lead.store(), 1).is_ok());

        // Past the gate (through node 1, which may or may not lead): nodes 1
        // and 2 commit and apply it; node 3 stops.
        let o = nodes[0]
            .propose_at_version(Command::put("new", b"v".to_vec()).unwrap(), None, 2)
            .await
            .unwrap();
        let old = threads.pop().unwrap();
        let ended = tokio::task::spawn_blocking(move || old.join().unwrap())
            .await
            .unwrap();
        assert!(
            matches!(ended, Err(NodeError::Apply { index, .. }) if index == o.index),
            "{ended:?}"
        );
        assert!(nodes[2].store().applied_index() < o.index);
        assert!(state::kv_get(nodes[2].store(), "new").unwrap().is_none());
        for n in &nodes[..2] {
            for _ in 0..300 {
                if n.store().applied_index() >= o.index {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(state::kv_get(n.store(), "new").unwrap().is_some());
        }
    }

    /// A storage failure stops the Raft loop with an error (the server then
    /// exits non-zero), and nothing more is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn storage_failure_ends_the_loop_with_an_error() {
        let engine = MemEngine::new();
        let fault = engine.fault_switch();
        let mut cfg = NodeConfig::new(1);
        cfg.tick = Duration::from_millis(10);
        let (h, thread) = single(cfg, engine).await;
        put_retrying(&h, "before", "b").await;
        fault.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = h
            .propose(Command::put("after", b"v".to_vec()).unwrap(), None)
            .await;
        assert!(r.is_err(), "a write was acknowledged after storage failed");
        let joined = tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        assert!(
            matches!(joined, Err(NodeError::Storage(_))),
            "the loop ended with {joined:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follower_writes_commit_and_reads_are_linearizable() {
        let (nodes, _net) = cluster(3, 10_000).await;
        let l = leader(&nodes).await;
        let follower = nodes.iter().find(|n| n.id() != l).unwrap();
        let o = put_retrying(follower, "a", "k1").await;
        // A retry with the same idempotency key is not applied again.
        let again = put_retrying(follower, "a", "k1").await;
        assert!(again.deduplicated);
        assert_eq!(again.index, o.index);
        for n in &nodes {
            let idx = n.read_index().await.unwrap();
            assert!(idx >= o.index);
            let rec = state::kv_get(n.store(), "a").unwrap().unwrap();
            assert_eq!(rec.version, 1, "node {}", n.id());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_off_node_catches_up_by_snapshot() {
        let (nodes, net) = cluster(3, 8).await;
        let l = leader(&nodes).await;
        let lagger = nodes.iter().find(|n| n.id() != l).unwrap().id();
        net.lock().unwrap().1.insert(lagger);
        // The leader keeps the log for followers it still hears from: wait
        // until it has noticed the cut (an election timeout).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lead = nodes.iter().find(|n| n.id() == l).unwrap();
        for i in 0..40 {
            put_retrying(lead, &format!("k{i}"), &format!("i{i}")).await;
        }
        let st = lead.status().await.unwrap();
        assert!(st.first_index > 3, "log not compacted: {}", st.first_index);
        net.lock().unwrap().1.clear();
        let lag = nodes.iter().find(|n| n.id() == lagger).unwrap();
        for _ in 0..500 {
            if lag.store().applied_index() >= st.commit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lag.store().applied_index() >= st.commit);
        assert_eq!(
            state::kv_list(lag.store(), "k", None, 100).unwrap().len(),
            40
        );
    }

    /// Large entries compact the log by bytes long before the entry count
    /// would, and a short tail (about half the byte threshold) is kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_compacted_by_bytes_as_well_as_entries() {
        let mut cfg = NodeConfig::new(1);
        cfg.tick = Duration::from_millis(10);
        cfg.compact_bytes = 64 << 10;
        let (h, _thread) = single(cfg, MemEngine::new()).await;
        let mut last = 0;
        for i in 0..40 {
            last = h
                .propose_retrying(
                    Command::put(format!("k{i}"), vec![7; 8 << 10]).unwrap(),
                    None,
                )
                .await
                .unwrap()
                .index;
        }
        let first = h.store().first_log_index();
        assert!(
            first > 20,
            "log not compacted by bytes: first index {first}"
        );
        let kept = last + 1 - first;
        assert!((2..=6).contains(&kept), "kept {kept} entries of 8 KiB");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn minority_side_cannot_commit() {
        let (nodes, net) = cluster(3, 10_000).await;
        let l = leader(&nodes).await;
        // Cut off the leader: it keeps no quorum, so nothing it accepts commits.
        net.lock().unwrap().1.insert(l);
        let lead = nodes.iter().find(|n| n.id() == l).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            lead.propose(Command::put("x", b"1".to_vec()).unwrap(), None),
        )
        .await;
        assert!(!matches!(r, Ok(Ok(_))), "isolated leader committed a write");
        // The others elect a new leader and commit.
        let others: Vec<_> = nodes.iter().filter(|n| n.id() != l).cloned().collect();
        let l2 = leader(&others).await;
        assert_ne!(l2, l);
        put_retrying(&others[0], "y", "y1").await;
    }
}
