//! The gateway: what every front door (exec, PostgreSQL, and next SSH,
//! Kubernetes and MCP) shares: the typed vocabulary ([`vocab`]: kinds of
//! target, the actions policy judges for each, evidence modes) and the live
//! sessions of this node ([`live`]: each with one "ended" signal, fed by
//! kills, token expiry, policy changes and shutdown).

pub mod live;
pub mod vocab;

pub use vocab::{Action, EvidenceMode, Kind};
