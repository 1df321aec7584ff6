//! The edge's health and metrics on its `metrics` address (plain HTTP;
//! bind it to loopback or a monitoring network): `/healthz` (200 while the
//! agent runs), `/readyz` (200 with at least one tunnel up and a
//! certificate that has not expired; 503 with the reason otherwise) and
//! `/metrics` in the Prometheus text format (`prometheus-client`): tunnels
//! up, sessions being served, and the certificate's expiry.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use custody_proto::metrics::{exposition, gauge, CONTENT_TYPE};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::identity;

pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}

/// Why the edge is not ready, if it is not.
fn not_ready(tunnels: usize, not_after: i64, now: i64) -> Option<String> {
    if now >= not_after {
        return Some(format!(
            "the edge certificate expired at {not_after} (unix time)"
        ));
    }
    (tunnels == 0).then(|| "no tunnel to a coordinator is up".to_string())
}

async fn readyz(State(a): State<Arc<Agent>>) -> Response {
    let tunnels = a.tunnels_up.load(Ordering::Relaxed);
    match not_ready(tunnels, a.identity().not_after, identity::now_secs()) {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics(State(a): State<Arc<Agent>>) -> Response {
    let mut reg = Registry::with_prefix("custody_edge");
    let tunnels = a.tunnels_up.load(Ordering::Relaxed);
    let not_after = a.identity().not_after;
    gauge(
        &mut reg,
        "tunnels_up",
        "Tunnels to coordinators up now",
        tunnels as i64,
    );
    gauge(
        &mut reg,
        "sessions_active",
        "Sessions being served now",
        a.sessions_active.load(Ordering::Relaxed) as i64,
    );
    gauge(
        &mut reg,
        "certificate_expiry_seconds",
        "When the edge certificate expires (unix time)",
        not_after,
    );
    gauge(
        &mut reg,
        "ready",
        "Whether /readyz answers 200 (1) or not (0)",
        i64::from(not_ready(tunnels, not_after, identity::now_secs()).is_none()),
    );
    match exposition(&reg) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_tunnel_and_a_live_certificate() {
        assert_eq!(not_ready(2, 1000, 10), None);
        assert!(not_ready(0, 1000, 10).unwrap().contains("no tunnel"));
        assert!(not_ready(3, 1000, 1000).unwrap().contains("expired"));
    }
}
