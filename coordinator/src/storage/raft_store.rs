use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage};

use custody_proto::cluster::v1 as pb;

use super::{state_cf, Cf, Engine, Op, Pairs, Stage, StateView, StorageError, CHUNKS_PREFIX};

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_TRUNCATED: &[u8] = b"truncated";

/// Index and term of the bootstrap point of a new cluster. Nodes that join later
/// start empty at index 0, so the leader must send them a snapshot: entries up to
/// this index do not exist in any log.
pub const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_u64(what: &'static str, b: &[u8]) -> Result<u64, StorageError> {
    let arr: [u8; 8] = b.try_into().map_err(|_| StorageError::Corrupt {
        what,
        detail: format!("expected 8 bytes, found {}", b.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn corrupt(what: &'static str) -> impl Fn(protobuf::ProtobufError) -> StorageError {
    move |e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

/// Cached copy of the small metadata kept in [`Cf::Meta`].
#[derive(Debug, Clone, Default)]
struct Meta {
    hard_state: HardState,
    conf_state: ConfState,
    applied: u64,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    /// The newest log entries, as appended (a copy of the stored tail).
    tail: Tail,
}

/// Entries most recently appended, kept in memory so that raft-rs's many
/// `term` lookups and the leader's appends to followers do not read the
/// log back from the engine. Contiguous; its last entry is the log's last.
#[derive(Debug, Clone, Default)]
struct Tail {
    entries: std::collections::VecDeque<Entry>,
    bytes: usize,
}

/// Bounds of the in-memory tail.
const TAIL_ENTRIES: usize = 4096;
const TAIL_BYTES: usize = 16 << 20;

impl Tail {
    fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.entries.front()?.index;
        let i = usize::try_from(index.checked_sub(first)?).ok()?;
        self.entries.get(i)
    }

    /// Records appended entries: they replace any cached entry at or after
    /// the first of them.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        match self.entries.front().map(|e| e.index) {
            Some(f) if f < first.index && self.get(first.index - 1).is_some() => {
                while self.entries.back().is_some_and(|e| e.index >= first.index) {
                    if let Some(e) = self.entries.pop_back() {
                        self.bytes -= e.data.len();
                    }
                }
            }
            _ => self.clear(),
        }
        for e in entries {
            self.bytes += e.data.len();
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > TAIL_ENTRIES || self.bytes > TAIL_BYTES {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= e.data.len(),
                None => break,
            }
        }
    }

    /// Forgets entries at or before `index`.
    fn compact(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.data.len();
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// Outgoing snapshots not claimed by a transport within this time are dropped
/// (raft-rs may build a snapshot message that is never sent).
const OUTGOING_TTL: std::time::Duration = std::time::Duration::from_secs(120);
/// At most this many pinned views wait for their transport.
const OUTGOING_MAX: usize = 4;

/// What a transport needs from a node's store to move snapshots. The state
/// never travels inside the Raft message: its data is a [`pb::SnapshotRef`]
/// to a pinned view (sending) or to a staged image (receiving).
pub trait SnapshotIo: Send + Sync + 'static {
    /// The pinned view behind an outgoing snapshot, once.
    fn take_outgoing(&self, id: u64) -> Option<Box<dyn StateView>>;
    /// Starts receiving an image.
    fn begin_incoming(&self) -> Result<Box<dyn IncomingImage>, StorageError>;
}

/// A snapshot image being received into a node's staging area.
pub trait IncomingImage: Send {
    /// The next pair; pairs come in key order within each column family.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    /// Ends the image and keeps it for Raft to install: the id for the
    /// [`pb::SnapshotRef`] handed to Raft. Only the newest image is kept.
    fn finish(self: Box<Self>) -> Result<u64, StorageError>;
}

/// Pinned views awaiting their transport, and received images awaiting Raft.
struct Snapshots<E: Engine> {
    outgoing: HashMap<u64, (std::time::Instant, E::View)>,
    incoming: HashMap<u64, E::Stage>,
}

impl<E: Engine> Default for Snapshots<E> {
    fn default() -> Self {
        Self {
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
        }
    }
}

/// Encodes the data of a raft-rs snapshot: a reference, never the state.
pub fn snapshot_ref(id: u64) -> Vec<u8> {
    pb::SnapshotRef { id }.encode_to_vec()
}

/// Decodes [`snapshot_ref`].
pub fn decode_snapshot_ref(data: &[u8]) -> Result<u64, StorageError> {
    pb::SnapshotRef::decode(data)
        .map(|r| r.id)
        .map_err(|e| StorageError::Corrupt {
            what: "snapshot reference",
            detail: e.to_string(),
        })
}

/// Raft log, raft metadata and state-machine data over an [`Engine`].
///
/// Implements raft-rs' [`Storage`]. All writes come from the node's Raft loop;
/// reads of the state machine may come from any thread.
pub struct RaftStore<E: Engine> {
    engine: Arc<E>,
    meta: Arc<RwLock<Meta>>,
    snapshots: Arc<Mutex<Snapshots<E>>>,
}

impl<E: Engine> Clone for RaftStore<E> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            meta: self.meta.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

impl<E: Engine> RaftStore<E> {
    /// Loads metadata from the engine.
    pub fn open(engine: E) -> Result<Self, StorageError> {
        engine.recover()?;
        let engine = Arc::new(engine);
        let mut meta = Meta::default();
        if let Some(b) = engine.get(Cf::Meta, KEY_HARD_STATE)? {
            meta.hard_state = HardState::parse_from_bytes(&b).map_err(corrupt("hard state"))?;
        }
        if let Some(b) = engine.get(Cf::Meta, KEY_CONF_STATE)? {
            meta.conf_state = ConfState::parse_from_bytes(&b).map_err(corrupt("conf state"))?;
        }
        if let Some(b) = engine.get(Cf::Meta, KEY_APPLIED)? {
            meta.applied = decode_u64("applied index", &b)?;
        }
        if let Some(b) = engine.get(Cf::Meta, KEY_TRUNCATED)? {
            if b.len() != 16 {
                return Err(StorageError::Corrupt {
                    what: "truncation point",
                    detail: format!("expected 16 bytes, found {}", b.len()),
                });
            }
            meta.truncated_index = decode_u64("truncation point", &b[..8])?;
            meta.truncated_term = decode_u64("truncation point", &b[8..])?;
        }
        meta.last_index = match engine.last_key(Cf::Log, &log_key(0), &log_key(u64::MAX))? {
            Some(k) => decode_u64("log key", &k)?,
            None => meta.truncated_index,
        }
        .max(meta.truncated_index);
        if meta.applied > meta.hard_state.commit && meta.hard_state.term > 0 {
            return Err(StorageError::Corrupt {
                what: "raft meta",
                detail: format!(
                    "applied index {} is past commit index {}",
                    meta.applied, meta.hard_state.commit
                ),
            });
        }
        Ok(Self {
            engine,
            meta: Arc::new(RwLock::new(meta)),
            snapshots: Arc::default(),
        })
    }

    fn meta(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        // The lock only guards plain data; a panic while holding it leaves
        // consistent values behind, so poisoning is ignored.
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshots(&self) -> std::sync::MutexGuard<'_, Snapshots<E>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn meta_mut(&self) -> std::sync::RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// True once the node has a configuration: bootstrapped, or received a snapshot.
    pub fn is_initialized(&self) -> bool {
        let m = self.meta();
        m.hard_state.term > 0 || !m.conf_state.voters.is_empty()
    }

    /// Starts a brand-new cluster on this node: every initial node calls this with the
    /// same voters and the same initial state, so all start identical at
    /// [`BOOTSTRAP_INDEX`].
    pub fn bootstrap(&self, voters: &[u64], state: Vec<Op>) -> Result<(), StorageError> {
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let hs = HardState {
            term: BOOTSTRAP_TERM,
            commit: BOOTSTRAP_INDEX,
            ..Default::default()
        };
        let mut ops = state;
        ops.push(Op::Put(Cf::Meta, KEY_HARD_STATE.to_vec(), encode_pb(&hs)));
        ops.push(Op::Put(Cf::Meta, KEY_CONF_STATE.to_vec(), encode_pb(&cs)));
        ops.push(Op::Put(
            Cf::Meta,
            KEY_APPLIED.to_vec(),
            BOOTSTRAP_INDEX.to_be_bytes().to_vec(),
        ));
        ops.push(Op::Put(
            Cf::Meta,
            KEY_TRUNCATED.to_vec(),
            truncated_bytes(BOOTSTRAP_INDEX, BOOTSTRAP_TERM),
        ));
        self.engine.write(ops, true)?;
        let mut m = self.meta_mut();
        m.hard_state = hs;
        m.conf_state = cs;
        m.applied = BOOTSTRAP_INDEX;
        m.truncated_index = BOOTSTRAP_INDEX;
        m.truncated_term = BOOTSTRAP_TERM;
        m.last_index = BOOTSTRAP_INDEX;
        m.tail.clear();
        Ok(())
    }

    /// Appends entries (replacing any conflicting tail) and the hard state in one
    /// batch, synced when `sync` is set. Raft requires a sync whenever entries,
    /// term or vote change; a change of the commit index alone need not be
    /// synced (raft-rs `Ready::must_sync`).
    pub fn append(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), StorageError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut ops = Vec::with_capacity(entries.len() + 2);
        let mut new_last = None;
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            let m = self.meta();
            if first.index <= m.truncated_index {
                return Err(StorageError::Corrupt {
                    what: "raft append",
                    detail: format!(
                        "entry {} is at or before the truncation point {}",
                        first.index, m.truncated_index
                    ),
                });
            }
            if first.index > m.last_index + 1 {
                return Err(StorageError::Corrupt {
                    what: "raft append",
                    detail: format!(
                        "gap: last index {}, appending {}",
                        m.last_index, first.index
                    ),
                });
            }
            let old_last = m.last_index;
            drop(m);
            for e in entries {
                ops.push(Op::Put(Cf::Log, log_key(e.index).to_vec(), encode_pb(e)));
            }
            // Drop an old, conflicting tail beyond the new entries. Only when
            // there is one: every range tombstone slows later reads of the CF.
            if old_last > last.index {
                ops.push(Op::DeleteRange(
                    Cf::Log,
                    log_key(last.index + 1).to_vec(),
                    log_key(old_last + 1).to_vec(),
                ));
            }
            new_last = Some(last.index);
        }
        if let Some(hs) = hs {
            ops.push(Op::Put(Cf::Meta, KEY_HARD_STATE.to_vec(), encode_pb(hs)));
        }
        self.engine.write(ops, sync || !entries.is_empty())?;
        let mut m = self.meta_mut();
        if let Some(l) = new_last {
            m.last_index = l;
            m.tail.append(entries);
        }
        if let Some(hs) = hs {
            m.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Applies state-machine writes and records the applied index (and, with them,
    /// a commit index at least as large and any new conf state) atomically.
    pub fn apply(
        &self,
        mut state: Vec<Op>,
        applied: u64,
        commit: u64,
        conf_state: Option<&ConfState>,
    ) -> Result<(), StorageError> {
        let mut hs = self.meta().hard_state.clone();
        let commit_changed = commit > hs.commit;
        if commit_changed {
            hs.commit = commit;
            state.push(Op::Put(Cf::Meta, KEY_HARD_STATE.to_vec(), encode_pb(&hs)));
        }
        state.push(Op::Put(
            Cf::Meta,
            KEY_APPLIED.to_vec(),
            applied.to_be_bytes().to_vec(),
        ));
        if let Some(cs) = conf_state {
            state.push(Op::Put(Cf::Meta, KEY_CONF_STATE.to_vec(), encode_pb(cs)));
        }
        // Applied state can be replayed from the synced log, so this batch need not sync.
        self.engine.write(state, false)?;
        let mut m = self.meta_mut();
        m.applied = applied;
        if commit_changed {
            m.hard_state = hs;
        }
        if let Some(cs) = conf_state {
            m.conf_state = cs.clone();
        }
        Ok(())
    }

    /// Replaces the whole state with the received image `id` (see
    /// [`SnapshotIo`]), emptying the log and setting the hard state, conf
    /// state and truncation point: all or nothing, also across a crash.
    pub fn install_snapshot(&self, meta: &SnapshotMetadata, id: u64) -> Result<(), StorageError> {
        let stage = {
            let mut snaps = self.snapshots();
            let stage = snaps.incoming.remove(&id);
            snaps.incoming.clear();
            stage
        }
        .ok_or_else(|| StorageError::Corrupt {
            what: "snapshot",
            detail: format!("no received image {id:x}"),
        })?;
        let mut hs = self.meta().hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let cs = meta.get_conf_state().clone();
        let ops = vec![
            Op::Put(Cf::Meta, KEY_HARD_STATE.to_vec(), encode_pb(&hs)),
            Op::Put(Cf::Meta, KEY_CONF_STATE.to_vec(), encode_pb(&cs)),
            Op::Put(
                Cf::Meta,
                KEY_APPLIED.to_vec(),
                meta.index.to_be_bytes().to_vec(),
            ),
            Op::Put(
                Cf::Meta,
                KEY_TRUNCATED.to_vec(),
                truncated_bytes(meta.index, meta.term),
            ),
        ];
        self.engine.install(stage, ops)?;
        let mut m = self.meta_mut();
        m.hard_state = hs;
        m.conf_state = cs;
        m.applied = meta.index;
        m.truncated_index = meta.index;
        m.truncated_term = meta.term;
        m.last_index = meta.index;
        m.tail.clear();
        Ok(())
    }

    /// Discards log entries up to and including `index`, which must be applied.
    pub fn compact(&self, index: u64) -> Result<(), StorageError> {
        let (first, applied) = {
            let m = self.meta();
            (m.truncated_index + 1, m.applied)
        };
        if index < first || index > applied {
            return Ok(());
        }
        let term = self
            .term(index)
            .map_err(|e| StorageError::Engine(e.to_string()))?;
        let ops = vec![
            Op::Put(
                Cf::Meta,
                KEY_TRUNCATED.to_vec(),
                truncated_bytes(index, term),
            ),
            Op::DeleteRange(Cf::Log, log_key(0).to_vec(), log_key(index + 1).to_vec()),
        ];
        self.engine.write(ops, false)?;
        let mut m = self.meta_mut();
        m.truncated_index = index;
        m.truncated_term = term;
        m.tail.compact(index);
        Ok(())
    }

    pub fn applied_index(&self) -> u64 {
        self.meta().applied
    }

    pub fn hard_state(&self) -> HardState {
        self.meta().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.meta().conf_state.clone()
    }

    /// First index still in the log (everything before it is in the snapshot).
    pub fn first_log_index(&self) -> u64 {
        self.meta().truncated_index + 1
    }

    pub fn state_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.engine.get(state_cf(key), key)
    }

    /// Scans the state key space (both its column families), merged in key order.
    fn scan_state(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        let chunks_end = prefix_end(CHUNKS_PREFIX).unwrap_or_default();
        let overlaps_chunks = to.is_none_or(|t| t > CHUNKS_PREFIX) && from < &chunks_end[..];
        let state = self.engine.scan(Cf::State, from, to, limit)?;
        if !overlaps_chunks {
            return Ok(state);
        }
        let chunks = self.engine.scan(Cf::Chunks, from, to, limit)?;
        if state.is_empty() {
            return Ok(chunks);
        }
        let mut out = Vec::with_capacity(limit.min(state.len() + chunks.len()));
        let (mut a, mut b) = (state.into_iter().peekable(), chunks.into_iter().peekable());
        while out.len() < limit {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => None,
            };
            match next {
                Some(p) => out.push(p),
                None => break,
            }
        }
        Ok(out)
    }

    /// State pairs whose key starts with `prefix`, after `start_after` if given.
    pub fn state_scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        let from = match start_after {
            Some(s) if s >= prefix => {
                let mut f = s.to_vec();
                f.push(0);
                f
            }
            _ => prefix.to_vec(),
        };
        let to = prefix_end(prefix);
        self.scan_state(&from, to.as_deref(), limit)
    }

    /// State pairs with keys in `[from, to)`, at most `limit`.
    pub fn state_scan_range(
        &self,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        self.scan_state(from, Some(to), limit)
    }
}

/// Smallest key greater than every key starting with `prefix` (None: unbounded).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn truncated_bytes(index: u64, term: u64) -> Vec<u8> {
    let mut b = index.to_be_bytes().to_vec();
    b.extend_from_slice(&term.to_be_bytes());
    b
}

fn encode_pb<M: protobuf::Message>(m: &M) -> Vec<u8> {
    // Encoding an in-memory message into a Vec cannot fail.
    m.write_to_bytes().unwrap_or_default()
}

struct Incoming<E: Engine> {
    stage: E::Stage,
    snapshots: Arc<Mutex<Snapshots<E>>>,
}

impl<E: Engine> IncomingImage for Incoming<E> {
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.stage.put(state_cf(key), key, value)
    }

    fn finish(mut self: Box<Self>) -> Result<u64, StorageError> {
        self.stage.finish()?;
        let id = rand::random::<u64>();
        let mut snaps = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        snaps.incoming.clear();
        snaps.incoming.insert(id, self.stage);
        Ok(id)
    }
}

impl<E: Engine> SnapshotIo for RaftStore<E> {
    fn take_outgoing(&self, id: u64) -> Option<Box<dyn StateView>> {
        self.snapshots()
            .outgoing
            .remove(&id)
            .map(|(_, v)| Box::new(v) as Box<dyn StateView>)
    }

    fn begin_incoming(&self) -> Result<Box<dyn IncomingImage>, StorageError> {
        Ok(Box::new(Incoming::<E> {
            stage: self.engine.stage()?,
            snapshots: self.snapshots.clone(),
        }))
    }
}

impl<E: Engine> Storage for RaftStore<E> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.meta();
        Ok(RaftState::new(m.hard_state.clone(), m.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        {
            let m = self.meta();
            if low <= m.truncated_index {
                return Err(raft::Error::Store(raft::StorageError::Compacted));
            }
            if high > m.last_index + 1 {
                return Err(raft::Error::Store(raft::StorageError::Unavailable));
            }
        }
        if low >= high {
            return Ok(Vec::new());
        }
        {
            let m = self.meta();
            if m.tail.get(low).is_some() {
                let mut out = Vec::new();
                let mut size = 0u64;
                for idx in low..high {
                    let Some(e) = m.tail.get(idx) else { break };
                    size += e.compute_size() as u64;
                    if max_size.is_some_and(|max| !out.is_empty() && size > max) {
                        break;
                    }
                    out.push(e.clone());
                }
                // The tail ends at the log's last entry, so it holds the
                // whole range unless the size limit cut it.
                return Ok(out);
            }
        }
        let pairs = self
            .engine
            .scan(
                Cf::Log,
                &log_key(low),
                Some(&log_key(high)),
                (high - low) as usize,
            )
            .map_err(raft::Error::from)?;
        let mut out = Vec::with_capacity(pairs.len());
        let mut size = 0u64;
        for (i, (k, v)) in pairs.into_iter().enumerate() {
            let idx = decode_u64("log key", &k)?;
            if idx != low + i as u64 {
                return Err(StorageError::Corrupt {
                    what: "raft log",
                    detail: format!("missing entry {}", low + i as u64),
                }
                .into());
            }
            let e = Entry::parse_from_bytes(&v).map_err(corrupt("raft log entry"))?;
            size += e.compute_size() as u64;
            if let Some(max) = max_size {
                if !out.is_empty() && size > max {
                    break;
                }
            }
            out.push(e);
        }
        if out.is_empty() {
            return Err(StorageError::Corrupt {
                what: "raft log",
                detail: format!("missing entry {low}"),
            }
            .into());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        {
            let m = self.meta();
            if idx == m.truncated_index {
                return Ok(m.truncated_term);
            }
            if idx < m.truncated_index {
                return Err(raft::Error::Store(raft::StorageError::Compacted));
            }
            if idx > m.last_index {
                return Err(raft::Error::Store(raft::StorageError::Unavailable));
            }
            if let Some(e) = m.tail.get(idx) {
                return Ok(e.term);
            }
        }
        let b = self
            .engine
            .get(Cf::Log, &log_key(idx))
            .map_err(raft::Error::from)?
            .ok_or_else(|| StorageError::Corrupt {
                what: "raft log",
                detail: format!("missing entry {idx}"),
            })?;
        let e = Entry::parse_from_bytes(&b).map_err(corrupt("raft log entry"))?;
        Ok(e.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.meta().truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.meta().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Called from the Raft loop, which is the only writer: the state read here
        // is exactly the state at `applied`.
        let (applied, cs) = {
            let m = self.meta();
            (m.applied, m.conf_state.clone())
        };
        if applied < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let term = self.term(applied)?;
        // The Raft loop is the only writer, so the view pinned now is the
        // state at `applied`. The transport streams it from another thread.
        let view = self.engine.pin()?;
        let id = rand::random::<u64>();
        {
            let mut snaps = self.snapshots();
            snaps
                .outgoing
                .retain(|_, (at, _)| at.elapsed() < OUTGOING_TTL);
            while snaps.outgoing.len() >= OUTGOING_MAX {
                let oldest = snaps
                    .outgoing
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(id, _)| *id);
                match oldest {
                    Some(o) => snaps.outgoing.remove(&o),
                    None => break,
                };
            }
            snaps.outgoing.insert(id, (std::time::Instant::now(), view));
        }
        let mut snap = Snapshot {
            data: snapshot_ref(id).into(),
            ..Default::default()
        };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(cs);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemEngine;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn store() -> RaftStore<MemEngine> {
        let s = RaftStore::open(MemEngine::new()).unwrap();
        s.bootstrap(&[1, 2, 3], vec![]).unwrap();
        s
    }

    /// Terms of a range, and (index, term) of its entries.
    type View = (Vec<u64>, Vec<(u64, u64)>);

    /// Terms and entries as served from the in-memory tail and as read
    /// back from the engine (tail dropped).
    fn both_ways(s: &RaftStore<MemEngine>, low: u64, high: u64) -> [View; 2] {
        let view = |s: &RaftStore<MemEngine>| {
            let terms = (low..high).map(|i| s.term(i).unwrap()).collect();
            let entries = s
                .entries(low, high, None, GetEntriesContext::empty(false))
                .unwrap()
                .iter()
                .map(|e| (e.index, e.term))
                .collect();
            (terms, entries)
        };
        let cached = view(s);
        s.meta_mut().tail.clear();
        [cached, view(s)]
    }

    #[test]
    fn the_in_memory_tail_matches_the_stored_log() {
        let s = store();
        let batch = |from: u64, to: u64, term: u64| -> Vec<Entry> {
            (from..=to).map(|i| entry(i, term)).collect()
        };
        s.append(&batch(2, 10, 1), None, true).unwrap();
        // A new leader overwrites a conflicting suffix.
        s.append(&batch(6, 8, 2), None, true).unwrap();
        assert!(s.meta().tail.get(6).is_some_and(|e| e.term == 2));
        let [cached, stored] = both_ways(&s, 2, 9);
        assert_eq!(cached, stored);
        assert_eq!(stored.0, vec![1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(s.last_index().unwrap(), 8);
        // Appends after a gap in the tail (after it was dropped) restart it.
        s.append(&batch(9, 12, 3), None, true).unwrap();
        assert!(s.meta().tail.get(8).is_none() && s.meta().tail.get(9).is_some());
        s.append(&batch(13, 14, 3), None, true).unwrap();
        let [cached, stored] = both_ways(&s, 3, 15);
        assert_eq!(cached, stored);
        // Compaction drops the tail's front; the rest still matches.
        s.append(&batch(15, 20, 3), None, true).unwrap();
        s.apply(vec![], 16, 16, None).unwrap();
        s.compact(16).unwrap();
        assert!(s.meta().tail.get(16).is_none());
        let [cached, stored] = both_ways(&s, 17, 21);
        assert_eq!(cached, stored);
        // The size limit still returns at least one entry.
        s.append(&batch(21, 25, 3), None, true).unwrap();
        let one = s
            .entries(21, 26, 1, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn the_in_memory_tail_is_bounded() {
        let s = store();
        let big: Vec<Entry> = (2..2 + TAIL_ENTRIES as u64 + 10)
            .map(|i| entry(i, 1))
            .collect();
        s.append(&big, None, true).unwrap();
        let m = s.meta();
        assert_eq!(m.tail.entries.len(), TAIL_ENTRIES);
        assert_eq!(m.tail.entries.back().map(|e| e.index), Some(m.last_index));
        drop(m);
        // Entries before the tail come from the engine.
        let e = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(e.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[test]
    fn bootstrap_sets_initial_state() {
        let s = store();
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(st.hard_state.commit, 1);
        assert_eq!(s.first_index().unwrap(), 2);
        assert_eq!(s.last_index().unwrap(), 1);
        assert_eq!(s.term(1).unwrap(), 1);
        assert!(matches!(
            s.term(0),
            Err(raft::Error::Store(raft::StorageError::Compacted))
        ));
    }

    #[test]
    fn append_replaces_conflicting_tail() {
        let s = store();
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)], None, true)
            .unwrap();
        s.append(&[entry(3, 2)], None, true).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        let ents = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(ents.len(), 2);
        // The old entry 4 is gone, also after reopening.
        assert!(s.term(4).is_err());
    }

    #[test]
    fn append_rejects_gaps() {
        let s = store();
        assert!(s.append(&[entry(5, 1)], None, true).is_err());
    }

    #[test]
    fn entries_respect_max_size_but_return_one() {
        let s = store();
        s.append(&[entry(2, 1), entry(3, 1), entry(4, 1)], None, true)
            .unwrap();
        let one = s.entries(2, 5, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1);
    }

    /// Streams the image behind `snap` from one store into another, as the
    /// transports do: the id of the image received.
    fn transfer(from: &RaftStore<MemEngine>, to: &RaftStore<MemEngine>, snap: &Snapshot) -> u64 {
        let view = from
            .take_outgoing(decode_snapshot_ref(&snap.data).unwrap())
            .unwrap();
        let mut image = to.begin_incoming().unwrap();
        for cf in [Cf::State, Cf::Chunks] {
            for (k, v) in view.scan(cf, b"", usize::MAX).unwrap() {
                image.put(&k, &v).unwrap();
            }
        }
        image.finish().unwrap()
    }

    #[test]
    fn compact_then_snapshot_round_trip() {
        let s = store();
        s.append(&[entry(2, 1), entry(3, 2)], None, true).unwrap();
        s.apply(
            vec![
                Op::Put(Cf::State, b"kv/a".to_vec(), b"1".to_vec()),
                Op::Put(Cf::Chunks, b"ev/c/s/0".to_vec(), b"chunk".to_vec()),
            ],
            3,
            3,
            None,
        )
        .unwrap();
        s.compact(3).unwrap();
        assert_eq!(s.first_index().unwrap(), 4);
        assert_eq!(s.term(3).unwrap(), 2);
        let snap = s.snapshot(3, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 3);
        assert_eq!(snap.get_metadata().term, 2);

        // Install it on a fresh, empty node.
        let t = RaftStore::open(MemEngine::new()).unwrap();
        assert!(!t.is_initialized());
        let image = transfer(&s, &t, &snap);
        t.install_snapshot(snap.get_metadata(), image).unwrap();
        assert!(t.is_initialized());
        assert_eq!(t.state_get(b"kv/a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(
            t.state_get(b"ev/c/s/0").unwrap(),
            Some(b"chunk".to_vec()),
            "the snapshot carries the chunks column family"
        );
        assert_eq!(t.applied_index(), 3);
        assert_eq!(t.hard_state().commit, 3);
        assert_eq!(t.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(t.first_index().unwrap(), 4);
    }

    #[test]
    fn apply_never_leaves_applied_past_commit() {
        let s = store();
        s.append(&[entry(2, 1)], None, true).unwrap();
        s.apply(vec![], 2, 2, None).unwrap();
        assert!(s.hard_state().commit >= s.applied_index());
    }

    #[test]
    fn chunks_live_in_their_own_column_family_and_scans_merge() {
        let s = store();
        let ops = ["ev/a", "ev/c/s/1", "ev/c/s/2", "ev/d", "kv/z"]
            .iter()
            .map(|k| {
                let k = k.as_bytes().to_vec();
                Op::Put(state_cf(&k), k, vec![])
            })
            .collect();
        s.apply(ops, 1, 1, None).unwrap();
        assert_eq!(s.engine.get(Cf::State, b"ev/c/s/1").unwrap(), None);
        assert!(s.engine.get(Cf::Chunks, b"ev/c/s/1").unwrap().is_some());
        let keys = |v: Pairs| -> Vec<String> {
            v.into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect()
        };
        assert_eq!(
            keys(s.state_scan(b"ev/", None, 10).unwrap()),
            ["ev/a", "ev/c/s/1", "ev/c/s/2", "ev/d"]
        );
        assert_eq!(
            keys(s.state_scan(b"ev/", None, 3).unwrap()),
            ["ev/a", "ev/c/s/1", "ev/c/s/2"]
        );
        assert_eq!(keys(s.state_scan(b"ev/c/s/", None, 10).unwrap()).len(), 2);
        assert_eq!(s.state_scan(b"", None, 100).unwrap().len(), 5);
    }

    #[test]
    fn scan_prefix_and_start_after() {
        let s = store();
        let ops = ["kv/a", "kv/b", "kv/c", "kw/x"]
            .iter()
            .map(|k| Op::Put(Cf::State, k.as_bytes().to_vec(), vec![]))
            .collect();
        s.apply(ops, 1, 1, None).unwrap();
        let got: Vec<_> = s
            .state_scan(b"kv/", Some(b"kv/a"), 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect();
        assert_eq!(got, vec!["kv/b", "kv/c"]);
        assert_eq!(prefix_end(&[0x61, 0xff]), Some(vec![0x62]));
    }
}
