//! Fault injection and benchmarks against real Custody processes.
//!
//! - [`proxy`]: a userspace TCP fault proxy (no `tc netem` here);
//! - [`partition`]: routes a cluster's Raft traffic through proxies so tests
//!   can cut chosen links;
//! - [`history`]: concurrent writers with unique values and a checker that
//!   every acknowledged write is present exactly once;
//! - [`bench`], [`tunnel_bench`], [`evidence_bench`]: the Raft, edge-tunnel and
//!   evidence benchmarks;
//! - [`snapshot_soak`]: a wiped follower replaced and caught up by a streamed
//!   snapshot of GiBs of evidence.

#![forbid(unsafe_code)]

pub mod bench;
pub mod evidence_bench;
pub mod history;
pub mod kube_bench;
pub mod mcp_bench;
pub mod partition;
pub mod pg_bench;
pub mod proxy;
pub mod snapshot_soak;
pub mod ssh_bench;
pub mod tunnel_bench;
