//! The `custody` command-line client, and the API client library it is built on.
//!
//! The library half ([`client`]) is reused by the chaos harness and the
//! end-to-end tests. The CLI itself is a thin layer in `main.rs` and `commands/`.

#![forbid(unsafe_code)]

pub mod client;
pub mod dev;
pub mod localkube;
pub mod localpg;
pub mod localssh;
pub mod login;
pub mod pg;
