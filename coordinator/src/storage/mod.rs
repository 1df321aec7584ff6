//! Durable storage for a coordinator node.
//!
//! Four column families live behind the [`Engine`] trait:
//! - [`Cf::Log`]: raft log entries keyed by big-endian index;
//! - [`Cf::Meta`]: hard state, conf state, applied index and the truncation point;
//! - [`Cf::State`]: the replicated state machine's data;
//! - [`Cf::Chunks`]: session evidence chunks, the bulk of the state.
//!
//! Snapshots are streamed: a sender pins a view of the state ([`StateView`])
//! and a receiver stages the image on disk ([`Stage`]) before one atomic
//! install, so neither holds the state in memory.
//!
//! [`RocksEngine`] is the production engine; [`MemEngine`] is its in-memory twin
//! for unit tests. [`RaftStore`] builds raft-rs' `Storage` and the write paths
//! the driver needs on top of either.

mod engine;
mod raft_store;
mod rocks;

pub use engine::{state_cf, Cf, Engine, MemEngine, Op, Pairs, Stage, StateView, CHUNKS_PREFIX};
pub use raft_store::{
    decode_snapshot_ref, prefix_end, snapshot_ref, IncomingImage, RaftStore, SnapshotIo,
};
pub use rocks::RocksEngine;

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The underlying engine failed (I/O, RocksDB).
    #[error("storage engine: {0}")]
    Engine(String),
    /// Bytes on disk did not decode: the data dir is damaged or from another program.
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}
