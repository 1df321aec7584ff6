pub mod cluster;
pub mod dev;
pub mod kv;
