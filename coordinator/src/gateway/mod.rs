//! The gateway: what every front door (exec, PostgreSQL, and next SSH,
//! Kubernetes and MCP) shares: the typed vocabulary ([`vocab`]: kinds of
//! target, the actions policy judges for each, evidence modes) and the live
//! sessions of this node ([`live`]: each with one "ended" signal, fed by
//! kills, token expiry, policy changes and shutdown), what every session
//! records the same way ([`session`]), and one error type, [`GatewayError`],
//! that each front door maps once.

pub mod authorize;
mod error;
pub mod exec;
pub mod guard;
pub mod judge;
pub mod listen;
pub mod live;
pub mod open;
pub mod relay;
mod route;
pub mod session;
pub mod stats;
pub mod vocab;

pub use error::GatewayError;
pub use guard::Guard;
pub use vocab::{Action, EvidenceMode, Kind, FILE_CONTENTS_LABEL};
