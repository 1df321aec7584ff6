use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use super::StorageError;

/// A column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    Log,
    Meta,
    State,
    /// Session evidence chunks: the state keys under [`CHUNKS_PREFIX`].
    Chunks,
}

/// State keys with this prefix live in [`Cf::Chunks`]; see [`state_cf`].
pub const CHUNKS_PREFIX: &[u8] = b"ev/c/";

/// The column family holding a state-machine key. The state is one key space
/// to its readers; evidence chunks (large, write-once, already compressed) sit
/// in their own column family.
pub fn state_cf(key: &[u8]) -> Cf {
    if key.starts_with(CHUNKS_PREFIX) {
        Cf::Chunks
    } else {
        Cf::State
    }
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Log, Cf::Meta, Cf::State, Cf::Chunks];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Log => "raft_log",
            Cf::Meta => "raft_meta",
            Cf::State => "state",
            Cf::Chunks => "session_chunks",
        }
    }
}

/// Key/value pairs in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// One write in an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Deletes keys in `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// An upper bound above every state key. State keys are UTF-8 or start with a
/// namespace byte below 0xff, so 0xff repeated bounds them all.
pub fn state_upper_bound() -> Vec<u8> {
    vec![0xff; 16]
}

/// A consistent view of [`Cf::State`] and [`Cf::Chunks`] pinned at one
/// instant, readable from another thread while writes go on. It holds no
/// copy of the data (for RocksDB: a database snapshot), so a snapshot of any
/// size is sent in memory that does not grow with it.
pub trait StateView: Send + 'static {
    /// Pairs of `cf` with keys at or after `from`, in key order: at least one
    /// (if any remain) and then more until about `max_bytes`.
    fn scan(&self, cf: Cf, from: &[u8], max_bytes: usize) -> Result<Pairs, StorageError>;
}

/// A snapshot image being received. Pairs arrive in key order within each
/// column family; the image goes to disk as it arrives (for RocksDB: SST
/// files in a staging directory), not into the live state.
pub trait Stage: Send + 'static {
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    /// Ends the image; it can then be installed.
    fn finish(&mut self) -> Result<(), StorageError>;
}

/// An ordered key-value engine with column families and atomic batches.
///
/// Implementations must apply a batch atomically, and when `sync` is set must not
/// return before the batch is durable.
pub trait Engine: Send + Sync + 'static {
    type View: StateView;
    type Stage: Stage;

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), StorageError>;
    /// Up to `limit` pairs with keys in `[from, to)` (`to = None`: unbounded), in key order.
    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Pairs, StorageError>;
    /// The last key in `[from, to)`, if any.
    fn last_key(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Pins a view of the state as it is now.
    fn pin(&self) -> Result<Self::View, StorageError>;
    /// Starts receiving a snapshot image.
    fn stage(&self) -> Result<Self::Stage, StorageError>;
    /// Replaces the state and chunks with a finished image, empties the log and
    /// then writes `meta` (all [`Cf::Meta`] puts). All or nothing across a
    /// crash: an install cut short is finished by the next [`Engine::recover`].
    fn install(&self, stage: Self::Stage, meta: Vec<Op>) -> Result<(), StorageError>;
    /// Finishes an install that a crash interrupted and drops stale staging
    /// data. Called once, before anything is read.
    fn recover(&self) -> Result<(), StorageError>;
}

type MemCf = BTreeMap<Vec<u8>, Vec<u8>>;

/// In-memory engine for unit tests. Not durable.
#[derive(Default)]
pub struct MemEngine {
    cfs: RwLock<BTreeMap<Cf, MemCf>>,
    fail_writes: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// A switch that makes every later write fail, as a full or broken disk
    /// would: tests use it to check what a storage failure does.
    pub fn fault_switch(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.fail_writes.clone()
    }
}

fn poisoned() -> StorageError {
    StorageError::Engine("memory engine lock poisoned".into())
}

/// The memory engine's pinned view: a copy (test-sized data only).
pub struct MemView(BTreeMap<Cf, MemCf>);

impl StateView for MemView {
    fn scan(&self, cf: Cf, from: &[u8], max_bytes: usize) -> Result<Pairs, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if let Some(m) = self.0.get(&cf) {
            for (k, v) in m.range::<[u8], _>((Bound::Included(from), Bound::Unbounded)) {
                if bytes >= max_bytes {
                    break;
                }
                bytes += k.len() + v.len();
                out.push((k.clone(), v.clone()));
            }
        }
        Ok(out)
    }
}

/// The memory engine's staged image.
#[derive(Default)]
pub struct MemStage {
    pairs: Vec<(Cf, Vec<u8>, Vec<u8>)>,
    finished: bool,
}

impl Stage for MemStage {
    fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        if let Some((_, last, _)) = self.pairs.iter().rev().find(|(c, _, _)| *c == cf) {
            if last.as_slice() >= key {
                return Err(StorageError::Corrupt {
                    what: "snapshot image",
                    detail: "keys out of order".into(),
                });
            }
        }
        self.pairs.push((cf, key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StorageError> {
        self.finished = true;
        Ok(())
    }
}

impl Engine for MemEngine {
    type View = MemView;
    type Stage = MemStage;

    fn pin(&self) -> Result<MemView, StorageError> {
        let cfs = self.cfs.read().map_err(|_| poisoned())?;
        Ok(MemView(
            cfs.iter()
                .filter(|(cf, _)| matches!(cf, Cf::State | Cf::Chunks))
                .map(|(cf, m)| (*cf, m.clone()))
                .collect(),
        ))
    }

    fn stage(&self) -> Result<MemStage, StorageError> {
        Ok(MemStage::default())
    }

    fn install(&self, stage: MemStage, meta: Vec<Op>) -> Result<(), StorageError> {
        if !stage.finished {
            return Err(StorageError::Engine(
                "snapshot image installed before it was finished".into(),
            ));
        }
        let mut ops = vec![
            Op::DeleteRange(Cf::State, Vec::new(), state_upper_bound()),
            Op::DeleteRange(Cf::Chunks, Vec::new(), state_upper_bound()),
            Op::DeleteRange(Cf::Log, Vec::new(), vec![0xff; 9]),
        ];
        ops.extend(stage.pairs.into_iter().map(|(cf, k, v)| Op::Put(cf, k, v)));
        ops.extend(meta);
        self.write(ops, true)
    }

    fn recover(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let cfs = self.cfs.read().map_err(|_| poisoned())?;
        Ok(cfs.get(&cf).and_then(|m| m.get(key).cloned()))
    }

    fn write(&self, ops: Vec<Op>, _sync: bool) -> Result<(), StorageError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StorageError::Engine("injected write failure".into()));
        }
        let mut cfs = self.cfs.write().map_err(|_| poisoned())?;
        for op in ops {
            match op {
                Op::Put(cf, k, v) => {
                    cfs.entry(cf).or_default().insert(k, v);
                }
                Op::Delete(cf, k) => {
                    cfs.entry(cf).or_default().remove(&k);
                }
                Op::DeleteRange(cf, from, to) => {
                    let m = cfs.entry(cf).or_default();
                    let doomed: Vec<Vec<u8>> = m
                        .range::<[u8], _>((Bound::Included(&from[..]), Bound::Excluded(&to[..])))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        m.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Pairs, StorageError> {
        let cfs = self.cfs.read().map_err(|_| poisoned())?;
        let Some(m) = cfs.get(&cf) else {
            return Ok(Vec::new());
        };
        let upper = match to {
            Some(t) => Bound::Excluded(t),
            None => Bound::Unbounded,
        };
        Ok(m.range::<[u8], _>((Bound::Included(from), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_key(&self, cf: Cf, from: &[u8], to: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let cfs = self.cfs.read().map_err(|_| poisoned())?;
        Ok(cfs.get(&cf).and_then(|m| {
            m.range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
                .next_back()
                .map(|(k, _)| k.clone())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_range_is_half_open() {
        let e = MemEngine::new();
        let ops = (0u8..5)
            .map(|i| Op::Put(Cf::Log, vec![i], vec![i]))
            .collect();
        e.write(ops, true).unwrap();
        e.write(vec![Op::DeleteRange(Cf::Log, vec![1], vec![3])], true)
            .unwrap();
        let keys: Vec<u8> = e
            .scan(Cf::Log, &[], None, 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k[0])
            .collect();
        assert_eq!(keys, vec![0, 3, 4]);
        assert_eq!(e.last_key(Cf::Log, &[0], &[4]).unwrap(), Some(vec![3]));
        assert_eq!(e.get(Cf::Meta, b"x").unwrap(), None);
    }
}
