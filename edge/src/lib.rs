//! The Custody edge agent.
//!
//! An edge sits inside a private network, accepts no inbound connections,
//! and dials out to every coordinator over QUIC ([`agent`]). It enrolls once
//! with a single-use token, keeping its private key local ([`identity`]), and
//! serves the resources in its config through connectors ([`shell`], [`postgres`], [`ssh`]). Target
//! credentials stay here; coordinators only see session streams.

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod dbtls;
pub mod health;
pub mod identity;
pub mod kube;
pub mod kube_exec;
pub mod postgres;
pub mod shell;
pub mod ssh;
pub mod tls;
