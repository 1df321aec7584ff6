//! What the coordinators' and the edges' `/metrics` share: gauges read at
//! each scrape into a `prometheus-client` registry, and its text
//! exposition.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The exposition's media type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Registers a gauge holding `value`.
pub fn gauge(reg: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    reg.register(name, help, g);
}

/// Registers a counter holding `value` (exposed as `NAME_total`).
pub fn counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c = prometheus_client::metrics::counter::Counter::<u64>::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

/// The registry in the text format.
pub fn exposition(reg: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    encode(&mut out, reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_are_exposed_with_their_help() {
        let mut reg = Registry::with_prefix("custody");
        gauge(&mut reg, "raft_term", "The Raft term", 7);
        let text = exposition(&reg).unwrap();
        assert!(
            text.contains("# HELP custody_raft_term The Raft term."),
            "{text}"
        );
        assert!(text.lines().any(|l| l == "custody_raft_term 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
