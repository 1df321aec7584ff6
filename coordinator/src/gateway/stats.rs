//! What the front doors count, for `/metrics`: sessions opened (by front
//! door and evidence mode) and authentication failures (by reason).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Label pairs, in the order they are exposed.
pub type Labels = Vec<(String, String)>;

#[derive(Default)]
pub struct GatewayStats {
    /// Sessions opened on this node, by `via` and `mode`.
    pub sessions: Family<Labels, Counter>,
    /// Tokens refused on this node, by `reason` (`AuthError::code`).
    pub auth_failures: Family<Labels, Counter>,
}

impl GatewayStats {
    pub fn session_opened(&self, via: &str, mode: &str) {
        self.sessions
            .get_or_create(&vec![
                ("via".to_string(), via.to_string()),
                ("mode".to_string(), mode.to_string()),
            ])
            .inc();
    }

    pub fn auth_failed(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }
}
