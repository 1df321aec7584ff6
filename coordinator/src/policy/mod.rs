//! Policy: who may do what on which resource. A pure engine (no I/O): parse a
//! document, validate it, evaluate requests, explain decisions.
//!
//! Decisions combine as follows. Every rule that matches the identity, the
//! resource and the action takes part:
//! 1. any `deny` rule denies;
//! 2. a guardrail referenced by a taking-part rule whose pattern matches the
//!    command denies or requires approval, as it says;
//! 3. any `require_approval` rule requires approval;
//! 4. any `allow` rule allows;
//! 5. otherwise the request is denied by default.

mod document;
mod engine;
pub mod mask;
pub mod sql;

pub use document::{
    parse_document, parse_duration_ms, ApprovalDoc, DocumentFormat, PolicyDocument, PolicyError,
};
pub(crate) use engine::wildcard;
pub use engine::{DecidedBy, Decision, Effect, Policy, Request, ResourceInfo, Role};
