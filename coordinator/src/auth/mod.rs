//! Authentication: verified identities from OIDC bearer tokens.

pub mod dev_issuer;
mod identity;
mod verifier;

pub use identity::{ClientKind, Identity};
pub use verifier::{AuthError, HttpJwks, IssuerConfig, JwksSource, Verifier};
