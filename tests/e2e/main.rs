//! End-to-end tests: real coordinator processes on loopback.
//!
//! One test binary (RocksDB links once); one module per area.

mod approvals;
mod auth;
mod bad_input;
mod cluster;
mod deploy;
mod dev;
mod edge;
mod evidence;
mod harness;
mod integrity;
mod kube;
mod mcp;
mod oidc;
mod postgres;
mod siem;
mod ssh;
