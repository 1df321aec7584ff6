//! Consensus: the raft-rs driver, its transport, and log bridging.

mod logger;
pub mod node;
pub mod snapshot;
pub mod stats;
pub mod transport;

pub use node::{
    spawn_ticker, start, Input, NodeConfig, NodeError, NodeHandle, NodeStatus, Transport,
};
