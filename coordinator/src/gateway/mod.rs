//! The gateway: what every front door (exec, PostgreSQL, and next SSH,
//! Kubernetes and MCP) shares. For now its typed vocabulary
//! ([`vocab`]): kinds of target, the actions policy judges for each, and
//! evidence modes.

pub mod vocab;

pub use vocab::{Action, EvidenceMode, Kind};
