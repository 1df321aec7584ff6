//! End-to-end tests live in `tests/e2e/`; the peers they need that no
//! package provides live here.

pub mod kube_api;
pub mod kube_exec;
