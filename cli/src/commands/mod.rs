pub mod cluster;
pub mod dev;
pub mod edge;
pub mod exec;
pub mod kv;
pub mod login;
pub mod policy;
pub mod whoami;
