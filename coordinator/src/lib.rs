//! The Custody coordinator: a Raft-replicated control plane.
//!
//! A node owns a RocksDB database ([`storage`]), drives raft-rs from one loop
//! ([`consensus`]), applies typed commands to its state machine ([`state`]),
//! verifies callers ([`auth`]) against policy ([`policy`]), accepts edge
//! tunnels and routes sessions to them ([`tunnel`]), and serves the
//! client/admin API ([`api`]). [`server::run`] wires them.
//!
//! What it leaves out so far: session evidence (recorded as audit log events
//! only) and approvals.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod consensus;
pub mod evidence;
pub mod gateway;
pub mod gen_config;
pub mod health;
pub mod kube;
pub mod mcp;
pub mod node_cert;
pub mod notify;
pub mod pg;
pub mod pki;
pub mod policy;
pub mod server;
pub mod siem;
pub mod ssh;
pub mod state;
pub mod storage;
pub mod tls;
pub mod tunnel;
